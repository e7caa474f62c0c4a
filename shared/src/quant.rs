//! Quantization of positions, velocities and orientation.
//!
//! The simulation snaps its state to these grids at the end of every tick, so the quantized snapshot
//! *is* the authoritative state: a client that holds it can predict exactly what the server computes.
//! All quanta are powers of two, so snapping and dequantizing are exact in `f32`.

use glam::Vec2;

/// Position quantum: 1/64 world unit (about 1.6 cm if a unit is a metre).
pub const POS_QUANTUM: f32 = 1.0 / 64.0;
/// Velocity quantum: 1/32 world unit per second.
pub const VEL_QUANTUM: f32 = 1.0 / 32.0;
/// Bits per velocity component on the wire (two's complement): ±64 units/s.
pub const VEL_BITS: u32 = 12;
/// Largest representable velocity component, in quanta.
pub const VEL_MAX_Q: i32 = (1 << (VEL_BITS - 1)) - 1;
/// Bits of orientation (yaw) on the wire: 256 steps per turn.
pub const YAW_BITS: u32 = 8;
/// Largest world extent the wire format supports on each axis, in units (20 bits of position).
pub const MAX_EXTENT: f32 = ((1u32 << 20) - 1) as f32 * POS_QUANTUM;

/// Position quantizer for one map: the world spans `[0, width] × [0, height]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosQuant {
    /// Bits per x coordinate on the wire.
    pub bits_x: u32,
    /// Bits per y coordinate on the wire.
    pub bits_y: u32,
    /// Largest valid quantized x.
    pub max_qx: u32,
    /// Largest valid quantized y.
    pub max_qy: u32,
}

/// Bits needed to hold every value in `0..=max`.
#[must_use]
pub fn bits_for(max: u32) -> u32 {
    (32 - max.leading_zeros()).max(1)
}

impl PosQuant {
    /// The quantizer for a world of `width × height` units (each clamped to `1..=MAX_EXTENT`).
    #[must_use]
    pub fn new(width: f32, height: f32) -> Self {
        let w = if width.is_finite() {
            width.clamp(1.0, MAX_EXTENT)
        } else {
            1.0
        };
        let h = if height.is_finite() {
            height.clamp(1.0, MAX_EXTENT)
        } else {
            1.0
        };
        let max_qx = (w / POS_QUANTUM).ceil() as u32;
        let max_qy = (h / POS_QUANTUM).ceil() as u32;
        Self {
            bits_x: bits_for(max_qx),
            bits_y: bits_for(max_qy),
            max_qx,
            max_qy,
        }
    }

    /// Quantizes a position (clamped into the world).
    #[must_use]
    pub fn quantize(&self, p: Vec2) -> (u32, u32) {
        (quant_axis(p.x, self.max_qx), quant_axis(p.y, self.max_qy))
    }

    /// The world position of a quantized pair.
    #[must_use]
    pub fn dequantize(&self, qx: u32, qy: u32) -> Vec2 {
        Vec2::new(qx as f32 * POS_QUANTUM, qy as f32 * POS_QUANTUM)
    }
}

fn quant_axis(v: f32, max_q: u32) -> u32 {
    if !v.is_finite() {
        return 0;
    }
    (v / POS_QUANTUM).round().clamp(0.0, max_q as f32) as u32
}

/// Snaps a position onto the position grid.
#[must_use]
pub fn snap_pos(p: Vec2) -> Vec2 {
    Vec2::new(
        (p.x / POS_QUANTUM).round() * POS_QUANTUM,
        (p.y / POS_QUANTUM).round() * POS_QUANTUM,
    )
}

/// Quantizes one velocity component (clamped to the wire range).
#[must_use]
pub fn quantize_vel(v: f32) -> i32 {
    if !v.is_finite() {
        return 0;
    }
    ((v / VEL_QUANTUM).round() as i32).clamp(-VEL_MAX_Q, VEL_MAX_Q)
}

/// Dequantizes a velocity component.
#[must_use]
pub fn dequantize_vel(q: i32) -> f32 {
    q as f32 * VEL_QUANTUM
}

/// Snaps a velocity onto the velocity grid (and into the wire range).
#[must_use]
pub fn snap_vel(v: Vec2) -> Vec2 {
    Vec2::new(
        dequantize_vel(quantize_vel(v.x)),
        dequantize_vel(quantize_vel(v.y)),
    )
}

/// Quantizes an angle in radians to `YAW_BITS` bits (0 = +x axis, counter-clockwise).
#[must_use]
pub fn quantize_yaw(radians: f32) -> u16 {
    if !radians.is_finite() {
        return 0;
    }
    let steps = (1u32 << YAW_BITS) as f32;
    let turns = radians / std::f32::consts::TAU;
    let frac = turns - turns.floor();
    ((frac * steps).round() as u32 % (1u32 << YAW_BITS)) as u16
}

/// The angle in radians of a quantized yaw.
#[must_use]
pub fn dequantize_yaw(q: u16) -> f32 {
    f32::from(q) * std::f32::consts::TAU / (1u32 << YAW_BITS) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trip_is_exact_on_grid() {
        let q = PosQuant::new(100.0, 60.0);
        assert_eq!(q.bits_x, 13);
        assert_eq!(q.bits_y, 12);
        let p = snap_pos(Vec2::new(12.3456, 59.99));
        let (x, y) = q.quantize(p);
        assert_eq!(q.dequantize(x, y), p);
    }

    #[test]
    fn position_clamps_and_rejects_nan() {
        let q = PosQuant::new(10.0, 10.0);
        assert_eq!(q.quantize(Vec2::new(-5.0, 50.0)), (0, q.max_qy));
        assert_eq!(q.quantize(Vec2::new(f32::NAN, f32::INFINITY)), (0, 0));
    }

    #[test]
    fn velocity_and_yaw() {
        assert_eq!(dequantize_vel(quantize_vel(3.0)), 3.0);
        assert_eq!(quantize_vel(1000.0), VEL_MAX_Q);
        assert_eq!(quantize_yaw(0.0), 0);
        assert_eq!(quantize_yaw(std::f32::consts::PI), 128);
        assert_eq!(quantize_yaw(-std::f32::consts::FRAC_PI_2), 192);
        assert_eq!(quantize_yaw(std::f32::consts::TAU - 0.001), 0);
        assert_eq!(quantize_yaw(dequantize_yaw(77)), 77);
    }
}
