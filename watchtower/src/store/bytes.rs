//! A byte vector as one run of bytes in the serde data model
//! (`serialize_bytes`), not a sequence of `u8`s. postcard writes both the
//! same way (a varint length, then the bytes), so stored values keep their
//! layout; only decoding changes: one copy instead of a `Visitor` call per
//! byte. A locator may hold hundreds of 32 KiB blobs, and the responder
//! reads them all each time an appointment restarts its job (a review
//! measured 4.9 s for three replacements at 300 such blobs).

use serde::de::{Deserializer, Error, SeqAccess, Visitor};
use serde::ser::Serializer;

pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(Bytes)
}

struct Bytes;

impl<'de> Visitor<'de> for Bytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    // Formats without a bytes type (JSON) hand a sequence.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        a: u64,
        blob: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Packed {
        a: u64,
        #[serde(with = "super")]
        blob: Vec<u8>,
    }

    #[test]
    fn the_stored_layout_does_not_change() {
        let blob: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let plain = postcard::to_allocvec(&Plain {
            a: 7,
            blob: blob.clone(),
        })
        .unwrap();
        let packed = postcard::to_allocvec(&Packed {
            a: 7,
            blob: blob.clone(),
        })
        .unwrap();
        assert_eq!(plain, packed);
        let back: Packed = postcard::from_bytes(&plain).unwrap();
        assert_eq!(back, Packed { a: 7, blob });
    }
}
