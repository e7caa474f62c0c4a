//! Tick numbers and wrapping sequence arithmetic.
//!
//! Ticks are `u32` and wrap; every comparison goes through [`Tick::diff`], so a server that has run for
//! 2^32 ticks (about 2 years at 60 Hz) keeps working across the wrap.

/// A simulation tick number. Wraps at `u32::MAX`; compare with [`Tick::diff`] / [`Tick::is_after`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, bincode::Encode, bincode::Decode)]
pub struct Tick(pub u32);

#[allow(clippy::should_implement_trait)] // wrapping by design; u32 operands, not Tick
impl Tick {
    /// The tick `n` ticks after this one (wrapping).
    #[must_use]
    pub fn add(self, n: u32) -> Tick {
        Tick(self.0.wrapping_add(n))
    }

    /// The tick `n` ticks before this one (wrapping).
    #[must_use]
    pub fn sub(self, n: u32) -> Tick {
        Tick(self.0.wrapping_sub(n))
    }

    /// Signed distance `self - other`, correct across the wrap as long as the two are within 2^31.
    #[must_use]
    pub fn diff(self, other: Tick) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// True when `self` is strictly later than `other`.
    #[must_use]
    pub fn is_after(self, other: Tick) -> bool {
        self.diff(other) > 0
    }

    /// The next tick.
    #[must_use]
    pub fn next(self) -> Tick {
        self.add(1)
    }
}

impl std::fmt::Display for Tick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Wrapping "newer than" for 16-bit sequence numbers (RFC 1982 serial arithmetic).
#[must_use]
pub fn seq16_is_after(a: u16, b: u16) -> bool {
    (a.wrapping_sub(b) as i16) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_across_wrap() {
        let a = Tick(u32::MAX - 1);
        let b = a.add(5);
        assert_eq!(b, Tick(3));
        assert_eq!(b.diff(a), 5);
        assert_eq!(a.diff(b), -5);
        assert!(b.is_after(a));
        assert!(!a.is_after(b));
        assert_eq!(b.sub(5), a);
    }

    #[test]
    fn seq16_wraps() {
        assert!(seq16_is_after(0, 65535));
        assert!(seq16_is_after(5, 65530));
        assert!(!seq16_is_after(65530, 5));
        assert!(!seq16_is_after(7, 7));
    }
}
