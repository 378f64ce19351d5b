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
    /// Names follow the OCI `ref.name` grammar: components of `[A-Za-z0-9]`
    /// joined by `-._:@+` and `/`.
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
        for comp in full.split('/') {
            let ok_chars = comp
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:@+".contains(&b));
            if !ok_chars {
                return Err(bad("only letters, digits, '/' and -._:@+ are allowed"));
            }
            let (Some(first), Some(end)) = (comp.bytes().next(), comp.bytes().last()) else {
                return Err(bad("empty path component"));
            };
            if !first.is_ascii_alphanumeric() || !end.is_ascii_alphanumeric() {
                return Err(bad(
                    "each component must start and end with a letter or digit",
                ));
            }
        }
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
