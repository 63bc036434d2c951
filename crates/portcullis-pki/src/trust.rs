//! The trust bundle that peers' certificates are verified against, and its overlap while a
//! CA is replaced.

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;

use crate::chain::validity_and_serial;

/// One trust anchor. `retained_until` is set once the anchor left the current chain.
#[derive(Debug, Clone, PartialEq)]
struct Anchor {
    der: CertificateDer<'static>,
    retained_until: Option<SystemTime>,
}

/// The roots a peer certificate may chain to.
///
/// During a CA change the bundle is the union of the old and new roots. A root that no longer
/// appears in Vault's chain stays trusted for `retention` after it was last seen, and never
/// past its own notAfter. Peers that still present certificates from the old CA keep working
/// until those expire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrustBundle {
    anchors: Vec<Anchor>,
}

impl TrustBundle {
    /// Returns a bundle of exactly `roots`.
    pub fn new(roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        let mut bundle = TrustBundle::default();
        for der in roots {
            if !bundle.anchors.iter().any(|anchor| anchor.der == der) {
                bundle.anchors.push(Anchor { der, retained_until: None });
            }
        }
        bundle
    }

    /// Returns the bundle that follows this one when the current roots are `current`: every
    /// current root, plus the earlier roots still inside their retention.
    pub fn next(&self, current: impl IntoIterator<Item = CertificateDer<'static>>, now: SystemTime, retention: Duration) -> TrustBundle {
        let mut next = TrustBundle::new(current);
        for old in &self.anchors {
            if next.contains(&old.der) {
                continue;
            }
            let retained_until = old.retained_until.unwrap_or_else(|| {
                let until = now + retention;
                match validity_and_serial(&old.der) {
                    Ok((_, not_after, _)) => until.min(not_after),
                    Err(_) => until,
                }
            });
            if retained_until > now {
                next.anchors.push(Anchor { der: old.der.clone(), retained_until: Some(retained_until) });
            }
        }
        next
    }

    pub fn contains(&self, der: &CertificateDer<'_>) -> bool {
        self.anchors.iter().any(|anchor| anchor.der.as_ref() == der.as_ref())
    }

    /// Returns the trust anchors, current roots first.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.anchors.iter().map(|anchor| anchor.der.clone()).collect()
    }

    /// Counts the roots that are only retained from an earlier chain.
    pub fn retained_count(&self) -> usize {
        self.anchors.iter().filter(|anchor| anchor.retained_until.is_some()).count()
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Returns the roots in PEM, for clients that read a CA file.
    pub fn pem(&self) -> String {
        self.anchors.iter().map(|anchor| der_to_pem(&anchor.der)).collect()
    }
}

/// Encodes one certificate as PEM, in 64-character base64 lines.
pub(crate) fn der_to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;

    let encoded = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::pem::PemObject;

    use super::*;

    fn root(days: u64) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = SystemTime::UNIX_EPOCH.into();
        params.not_after = (SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400)).into();
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn old_root_is_trusted_with_the_new_one_during_retention() {
        let (old, new) = (root(365), root(365));
        let bundle = TrustBundle::new([old.clone()]);

        let overlap = bundle.next([new.clone()], at(1000), Duration::from_secs(600));

        assert_eq!(overlap.roots(), vec![new.clone(), old.clone()]);
        assert_eq!(overlap.retained_count(), 1);
        let later = overlap.next([new.clone()], at(1599), Duration::from_secs(600));
        assert_eq!(later.roots(), vec![new.clone(), old]);
        let after = later.next([new.clone()], at(1600), Duration::from_secs(600));
        assert_eq!(after.roots(), vec![new]);
    }

    #[test]
    fn retention_never_outlives_the_old_root() {
        let (old, new) = (root(1), root(365));
        let bundle = TrustBundle::new([old.clone()]);

        let overlap = bundle.next([new.clone()], at(86_000), Duration::from_secs(3600));
        let after = overlap.next([new.clone()], at(86_400), Duration::from_secs(3600));

        assert_eq!(overlap.len(), 2);
        assert_eq!(after.roots(), vec![new]);
    }

    #[test]
    fn root_seen_again_is_current_again() {
        let (old, new) = (root(365), root(365));
        let overlap = TrustBundle::new([old.clone()]).next([new.clone()], at(0), Duration::from_secs(60));

        let back = overlap.next([new.clone(), old.clone()], at(30), Duration::from_secs(60));

        assert_eq!(back.retained_count(), 0);
        assert_eq!(back.roots(), vec![new, old]);
    }

    #[test]
    fn pem_round_trips() {
        let (first, second) = (root(365), root(365));
        let bundle = TrustBundle::new([first.clone(), second.clone(), first.clone()]);

        let parsed = CertificateDer::pem_slice_iter(bundle.pem().as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();

        assert_eq!(parsed, vec![first, second]);
    }
}
