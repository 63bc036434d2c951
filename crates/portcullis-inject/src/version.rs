//! The Kubernetes server version, which decides between a native sidecar and a regular
//! container.

use std::fmt;

/// First Kubernetes version whose kubelet runs native sidecars (init containers with
/// `restartPolicy: Always`) without a feature gate: the `SidecarContainers` gate is beta and
/// enabled by default from 1.29 on.
pub const NATIVE_SIDECAR_MINIMUM: KubernetesVersion = KubernetesVersion {
    major: 1,
    minor: 29,
};

/// The major and minor version of a Kubernetes API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubernetesVersion {
    pub major: u32,
    pub minor: u32,
}

impl KubernetesVersion {
    /// Parses the forms that clusters report: `v1.30.2`, `1.30`, `v1.29.3-gke.1200`, and the
    /// `1.29+` minor version of some managed clusters. Only major and minor are kept.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let without_prefix = trimmed.strip_prefix('v').unwrap_or(trimmed);
        let mut parts = without_prefix.splitn(3, '.');

        let major = parts.next().and_then(leading_number);
        let minor = parts.next().and_then(leading_number);
        match (major, minor) {
            (Some(major), Some(minor)) => Ok(KubernetesVersion { major, minor }),
            _ => Err(format!(
                "invalid Kubernetes version {text:?}; expected MAJOR.MINOR such as 1.30 or v1.30.2"
            )),
        }
    }

    /// Whether pods on this version run init containers with `restartPolicy: Always` as
    /// native sidecars.
    pub fn supports_native_sidecars(self) -> bool {
        self >= NATIVE_SIDECAR_MINIMUM
    }
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Reads the digits at the start of `part` (`29` from `29+` or `3-gke`); `None` when
/// `part` does not start with a digit.
fn leading_number(part: &str) -> Option<u32> {
    let digits_end = part
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(part.len());
    part[..digits_end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_reported_forms() {
        let cases = [
            ("v1.30.2", (1, 30)),
            ("1.30", (1, 30)),
            ("v1.29.3-gke.1200", (1, 29)),
            ("1.29+", (1, 29)),
            (" v1.28.0 ", (1, 28)),
        ];
        for (text, (major, minor)) in cases {
            assert_eq!(
                KubernetesVersion::parse(text),
                Ok(KubernetesVersion { major, minor }),
                "{text}"
            );
        }
    }

    #[test]
    fn parse_rejects_text_without_minor() {
        assert_eq!(
            KubernetesVersion::parse("v1"),
            Err(
                "invalid Kubernetes version \"v1\"; expected MAJOR.MINOR such as 1.30 or v1.30.2"
                    .to_owned()
            )
        );
        assert!(KubernetesVersion::parse("latest").is_err());
        assert!(KubernetesVersion::parse("").is_err());
        assert!(KubernetesVersion::parse("1.x").is_err());
    }

    #[test]
    fn native_sidecars_start_at_1_29() {
        let version = |text| KubernetesVersion::parse(text).expect("valid version");

        assert!(!version("1.28").supports_native_sidecars());
        assert!(version("1.29").supports_native_sidecars());
        assert!(version("1.35").supports_native_sidecars());
        assert!(version("2.0").supports_native_sidecars());
    }
}
