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
                write_canonical(&Value::String(key.clone()), out);
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
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}
