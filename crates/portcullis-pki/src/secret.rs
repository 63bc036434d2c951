//! A value that must never reach a log: Vault tokens, secret IDs and private keys.

use std::fmt;

/// A secret whose `Debug` output is redacted. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// Returns the secret value, which callers must not log or format.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_value() {
        let token = Secret::new("hvs.s3cr3t".to_owned());

        assert_eq!(format!("{token:?}"), "Secret(<redacted>)");
        assert_eq!(token.expose(), "hvs.s3cr3t");
    }
}
