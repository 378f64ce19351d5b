//! Image names and the index.json annotation that carries them.

use std::fmt;

use oci_spec::image::Descriptor;

use super::StoreError;

/// The annotation that names a manifest in index.json (read by skopeo, umoci, podman).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The ref name of an index.json descriptor, if it has one.
pub(crate) fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()?
        .get(REF_NAME_ANNOTATION)
        .map(String::as_str)
}

/// A validated image name, always `NAME:TAG` (the tag defaults to `latest`).
///
/// ```
/// let n = kiln::store::ImageName::parse("busybox").unwrap();
/// assert_eq!(n.to_string(), "busybox:latest");
/// assert_eq!(n.repository(), "busybox");
/// assert!(kiln::store::ImageName::parse("../etc").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageName(String);

impl ImageName {
    /// Parses and validates a name; adds `:latest` when no tag is given.
    ///
    /// Names follow the Docker/OCI reference grammar that podman, skopeo
    /// and registries use: an optional registry host (`HOST[:PORT]/`),
    /// path components of lowercase letters and digits joined by `.`, `_`,
    /// `__` or dashes, and a tag of up to 128 of `[A-Za-z0-9_.-]` (not
    /// starting with `.` or `-`), or `@sha256:<hex>`.
    pub fn parse(s: &str) -> Result<ImageName, StoreError> {
        let bad = |reason| StoreError::InvalidName {
            name: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 255 {
            return Err(bad("longer than 255 characters"));
        }
        let last = s.rsplit('/').next().unwrap_or(s);
        let full = if last.contains(':') || last.contains('@') {
            s.to_string()
        } else {
            format!("{s}:latest")
        };
        grammar(&full).map_err(bad)?;
        Ok(ImageName(full))
    }

    /// The whole name, `NAME:TAG`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the tag.
    pub fn repository(&self) -> &str {
        self.split().0
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        self.split().1
    }

    fn split(&self) -> (&str, &str) {
        let slash = self.0.rfind('/').map_or(0, |i| i + 1);
        match self.0[slash..].rfind(':') {
            Some(i) => (&self.0[..slash + i], &self.0[slash + i + 1..]),
            None => (&self.0, "latest"),
        }
    }
}

/// Checks `NAME:TAG` (or `NAME@DIGEST`) against the reference grammar.
fn grammar(full: &str) -> Result<(), &'static str> {
    let (name, suffix) = match full.split_once('@') {
        Some((n, d)) => (n, Err(d)),
        None => {
            let slash = full.rfind('/').map_or(0, |i| i + 1);
            match full[slash..].rfind(':') {
                Some(i) => (&full[..slash + i], Ok(&full[slash + i + 1..])),
                None => (full, Ok("latest")),
            }
        }
    };
    match suffix {
        Ok(tag) => {
            let b = tag.as_bytes();
            let ok = !b.is_empty()
                && b.len() <= 128
                && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
            if !ok {
                return Err("a tag is 1-128 of letters, digits, '_', '.', '-', not starting with '.' or '-'");
            }
        }
        Err(digest) => {
            let ok = digest.split_once(':').is_some_and(|(alg, hex)| {
                !alg.is_empty()
                    && alg
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && hex.len() >= 32
                    && hex.bytes().all(|c| c.is_ascii_hexdigit())
            });
            if !ok {
                return Err("a digest is ALGORITHM:HEX (e.g. sha256:...)");
            }
        }
    }
    let mut comps: Vec<&str> = name.split('/').collect();
    // A first component with a dot or a port, or `localhost`, is a registry host.
    if comps.len() > 1
        && (comps[0].contains('.') || comps[0].contains(':') || comps[0] == "localhost")
    {
        let host = comps.remove(0);
        let (h, port) = host.split_once(':').unwrap_or((host, "0"));
        let ok = !h.is_empty()
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
            && !port.is_empty()
            && port.bytes().all(|c| c.is_ascii_digit());
        if !ok {
            return Err("the registry host must be HOST[:PORT]");
        }
    }
    for c in comps {
        let b = c.as_bytes();
        let (Some(first), Some(last)) = (b.first(), b.last()) else {
            return Err("empty path component");
        };
        if !b
            .iter()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(x))
        {
            return Err(
                "a name is lowercase letters and digits, joined by '.', '_', '__' or '-' (and '/')",
            );
        }
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err("each name component must start and end with a letter or digit");
        }
        // Separators: '.', '_' or '__' once between runs; dashes any number.
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'.' || b[i] == b'_' {
                let run = b[i..]
                    .iter()
                    .take_while(|x| **x == b'.' || **x == b'_')
                    .count();
                let sep = &c[i..i + run];
                if !matches!(sep, "." | "_" | "__") {
                    return Err("separators in a name are '.', '_', '__' or dashes");
                }
                i += run;
            } else {
                i += 1;
            }
        }
    }
    Ok(())
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (input, want) in [
            ("busybox", Some("busybox:latest")),
            ("busybox:1.36", Some("busybox:1.36")),
            ("kiln/toolchain:v1", Some("kiln/toolchain:v1")),
            ("localhost:5000/a", Some("localhost:5000/a:latest")),
            ("", None),
            ("-x", None),
            ("x/", None),
            ("../etc", None),
            ("a b", None),
            ("a//b", None),
            ("My_Image:V1", None),
            ("my_image:V1", Some("my_image:V1")),
            ("a..b", None),
            ("a__b/c-d--e", Some("a__b/c-d--e:latest")),
            ("a:-x", None),
            ("reg.example.com/a/b:1.0", Some("reg.example.com/a/b:1.0")),
            (
                "Reg.example.com:443/a",
                Some("Reg.example.com:443/a:latest"),
            ),
            (
                "a@sha256:0123456789abcdef0123456789abcdef",
                Some("a@sha256:0123456789abcdef0123456789abcdef"),
            ),
            ("a@md5", None),
            ("recovered:0123456789ab", Some("recovered:0123456789ab")),
        ] {
            assert_eq!(
                ImageName::parse(input).ok().map(|n| n.to_string()),
                want.map(String::from),
                "{input}"
            );
        }
        let n = ImageName::parse("localhost:5000/a/b:t").unwrap();
        assert_eq!((n.repository(), n.tag()), ("localhost:5000/a/b", "t"));
    }
}
