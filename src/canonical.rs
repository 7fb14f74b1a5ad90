//! Canonical JSON: one byte string per JSON value whatever its key order and formatting. The
//! cache key and the prompt store's content hashes both hash it, so it lives apart from either.

use serde_json::Value;

/// JSON with object keys sorted and no whitespace, so key order and formatting do not matter.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(key.as_str(), out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        // Strings, numbers, booleans and null have one serialization already.
        scalar => write_scalar(scalar, out),
    }
}

/// Written straight into `out`: the same bytes as `to_string()`, without a `String` for each
/// key and value (the cache key is computed on every request).
fn write_scalar<T: serde::Serialize + ?Sized>(scalar: &T, out: &mut Vec<u8>) {
    // Writing JSON into a Vec fails only for a map with non-string keys, which a scalar is not.
    let _ = serde_json::to_writer(&mut *out, scalar);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_are_those_of_sorted_compact_json() {
        let value: Value = serde_json::from_str(
            r#"{"b": [1, 2.5, -3e2, true, null], "a": {"z": "line\nbreak \"q\" é", "y": {}}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"y":{},"z":"line\nbreak \"q\" é"},"b":[1,2.5,-300.0,true,null]}"#
        );
    }
}
