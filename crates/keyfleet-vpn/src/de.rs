//! Lenient deserialisation of fields real servers are loose about.

use serde::{Deserialize, Deserializer};
use serde_json::Number;

/// A byte counter from any JSON number (floats rounded, negatives 0) or `null` (0).
pub(crate) fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<Number>::deserialize(d)?
        .map(number_to_u64)
        .unwrap_or(0))
}

pub(crate) fn number_to_u64(n: Number) -> u64 {
    match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => u,
        // `as` saturates: huge values become u64::MAX.
        (None, Some(f)) if f.is_finite() && f > 0.0 => f.round() as u64,
        _ => 0,
    }
}

/// An id that should be a string but may arrive as a number.
pub(crate) fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(Number),
    }
    Ok(match Id::deserialize(d)? {
        Id::Text(s) => s,
        Id::Number(n) => n.to_string(),
    })
}

/// A string that may be `null` or missing (empty).
pub(crate) fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "super::lenient_u64")]
        n: u64,
        #[serde(deserialize_with = "super::string_or_number")]
        id: String,
        #[serde(default, deserialize_with = "super::null_as_empty")]
        name: String,
    }

    #[test]
    fn lenient_fields() {
        let t: T = serde_json::from_str(r#"{"n": 12.6, "id": 7, "name": null}"#).unwrap();
        assert_eq!((t.n, t.id.as_str(), t.name.as_str()), (13, "7", ""));
        let t: T = serde_json::from_str(r#"{"n": -3, "id": "kf-a"}"#).unwrap();
        assert_eq!((t.n, t.id.as_str()), (0, "kf-a"));
        let t: T = serde_json::from_str(r#"{"n": null, "id": "x", "extra": [1]}"#).unwrap();
        assert_eq!(t.n, 0);
        let t: T = serde_json::from_str(r#"{"n": 18446744073709551615, "id": "x"}"#).unwrap();
        assert_eq!(t.n, u64::MAX);
        assert!(serde_json::from_str::<T>(r#"{"n": "7", "id": "x"}"#).is_err());
    }
}
