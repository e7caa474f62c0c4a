//! The arena map: bounds, walls and spawn points, parsed from TOML text (no file I/O here).

use glam::Vec2;
use serde::Deserialize;

use crate::quant::MAX_EXTENT;

/// An axis-aligned wall rectangle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wall {
    /// Lower-left corner.
    pub min: Vec2,
    /// Upper-right corner.
    pub max: Vec2,
}

/// A loaded, validated map.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    /// Identifier sent to clients in `welcome`.
    pub id: String,
    /// Width of the world in units; x spans `[0, width]`.
    pub width: f32,
    /// Height of the world in units; y spans `[0, height]`.
    pub height: f32,
    /// Solid rectangles.
    pub walls: Vec<Wall>,
    /// Where players (re)spawn, in order of preference.
    pub spawns: Vec<Vec2>,
}

/// Why a map file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Not valid TOML or wrong field types.
    #[error("invalid map TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// Parsed, but the content is not usable.
    #[error("invalid map: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    id: String,
    width: f32,
    height: f32,
    #[serde(default)]
    walls: Vec<WallFile>,
    spawns: Vec<[f32; 2]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WallFile {
    min: [f32; 2],
    max: [f32; 2],
}

impl Map {
    /// Parses and validates a map from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, MapError> {
        let f: MapFile = toml::from_str(text)?;
        let bad = |m: String| Err(MapError::Invalid(m));
        if f.id.is_empty() || f.id.len() > 64 {
            return bad("id must be 1..=64 bytes".into());
        }
        for (name, v) in [("width", f.width), ("height", f.height)] {
            if !v.is_finite() || !(4.0..=MAX_EXTENT).contains(&v) {
                return bad(format!("{name} must be within 4..={MAX_EXTENT}"));
            }
        }
        let inside = |p: [f32; 2]| {
            p.iter().all(|c| c.is_finite())
                && (0.0..=f.width).contains(&p[0])
                && (0.0..=f.height).contains(&p[1])
        };
        if f.walls.len() > crate::wire::MAX_WALLS {
            return bad(format!("at most {} walls", crate::wire::MAX_WALLS));
        }
        let mut walls = Vec::with_capacity(f.walls.len());
        for (i, w) in f.walls.iter().enumerate() {
            if !inside(w.min) || !inside(w.max) || w.min[0] >= w.max[0] || w.min[1] >= w.max[1] {
                return bad(format!("wall {i} must have min < max, inside the bounds"));
            }
            walls.push(Wall {
                min: Vec2::from(w.min),
                max: Vec2::from(w.max),
            });
        }
        if f.spawns.is_empty() {
            return bad("at least one spawn point is required".into());
        }
        let mut spawns = Vec::with_capacity(f.spawns.len());
        for (i, s) in f.spawns.iter().enumerate() {
            if !inside(*s) {
                return bad(format!("spawn {i} is outside the bounds"));
            }
            let p = Vec2::from(*s);
            if walls
                .iter()
                .any(|w| p.cmpge(w.min).all() && p.cmple(w.max).all())
            {
                return bad(format!("spawn {i} is inside a wall"));
            }
            spawns.push(p);
        }
        Ok(Self {
            id: f.id,
            width: f.width,
            height: f.height,
            walls,
            spawns,
        })
    }

    /// A plain open arena of the given size with one spawn in the middle (tests and benches).
    #[must_use]
    pub fn open(width: f32, height: f32) -> Self {
        Self {
            id: "open".into(),
            width,
            height,
            walls: Vec::new(),
            spawns: vec![Vec2::new(width / 2.0, height / 2.0)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_map() {
        let m = Map::from_toml(
            "id='a'\nwidth=50\nheight=40\nspawns=[[1,1],[49,39]]\n[[walls]]\nmin=[10,10]\nmax=[12,30]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.walls.len(), 1);
        assert_eq!(m.spawns.len(), 2);
    }

    #[test]
    fn refuses_bad_maps() {
        for text in [
            "id='a'\nwidth=50\nheight=40\nspawns=[]\n",
            "id='a'\nwidth=nan\nheight=40\nspawns=[[1,1]]\n",
            "id='a'\nwidth=50\nheight=40\nspawns=[[100,1]]\n",
            "id='a'\nwidth=50\nheight=40\nspawns=[[11,11]]\n[[walls]]\nmin=[10,10]\nmax=[12,30]\n",
            "id='a'\nwidth=50\nheight=40\nspawns=[[1,1]]\n[[walls]]\nmin=[10,10]\nmax=[5,30]\n",
            "not toml",
            "id='a'\nwidth=50\nheight=40\nspawns=[[1,1]]\nextra=1\n",
        ] {
            assert!(Map::from_toml(text).is_err(), "{text}");
        }
    }
}
