//! The `user.rootlesscontainers` xattr: where rootless unpackers (umoci,
//! kiln) record a file's real owner when they could not chown it.

/// The xattr in which rootless unpackers (umoci, kiln) record a file's real
/// owner when they could not chown it.
pub const ROOTLESS_XATTR: &str = "user.rootlesscontainers";

/// Decodes the `user.rootlesscontainers` protobuf (`uint32 uid = 1; uint32 gid = 2;`).
pub fn decode_rootless(v: &[u8]) -> Option<(u32, u32)> {
    let (mut uid, mut gid) = (0u32, 0u32);
    let mut i = 0;
    while i < v.len() {
        let key = v[i];
        i += 1;
        let mut val: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *v.get(i)?;
            i += 1;
            val |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
        match key {
            0x08 => uid = u32::try_from(val).ok()?,
            0x10 => gid = u32::try_from(val).ok()?,
            _ => return None,
        }
    }
    Some((uid, gid))
}

/// Encodes the `user.rootlesscontainers` protobuf.
pub fn encode_rootless(uid: u32, gid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, mut v) in [(0x08u8, uid), (0x10u8, gid)] {
        if v == 0 {
            continue;
        }
        out.push(key);
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_xattr_round_trip() {
        for (u, g) in [(0, 0), (1000, 1000), (65534, 5), (300, 0), (u32::MAX, 1)] {
            assert_eq!(decode_rootless(&encode_rootless(u, g)), Some((u, g)));
        }
        assert_eq!(decode_rootless(&[0x08]), None);
    }
}
