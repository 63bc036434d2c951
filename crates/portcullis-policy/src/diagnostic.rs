//! Extraction of file, line and message from regorus error text.
//!
//! regorus 0.14.1 returns `anyhow::Error` values whose text is a rendered snippet:
//!
//! ```text
//!
//! --> envoy/authz/policy.rego:5:1
//!   |
//! 5 | }
//!   | ^
//! error: expecting expression
//! ```
//!
//! Operators read these in one-line logs and callers match on them, so this module turns the
//! snippet into structured fields.

/// A regorus error located in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl Diagnostic {
    /// Parses the first `--> file:line:column` snippet in `text`, or returns `None` when the
    /// error carries no location.
    pub fn parse(text: &str) -> Option<Diagnostic> {
        let location_start = text.find("--> ")? + "--> ".len();
        let location = text[location_start..].lines().next()?;

        // File names may contain ':', so split from the right.
        let mut parts = location.rsplitn(3, ':');
        let column = parts.next()?.trim().parse().ok()?;
        let line = parts.next()?.trim().parse().ok()?;
        let file = parts.next()?.to_string();

        Some(Diagnostic {
            file,
            line,
            column,
            message: snippet_message(&text[location_start..]),
        })
    }
}

/// Returns the text after the snippet's `error: ` line, or the whole text on one line.
fn snippet_message(snippet: &str) -> String {
    match snippet.rfind("\nerror: ") {
        Some(index) => snippet[index + "\nerror: ".len()..].trim().to_string(),
        None => one_line(snippet),
    }
}

/// Renders any regorus error text on one line: `file:line:column: message` when located.
pub(crate) fn one_line(text: &str) -> String {
    if let Some(diagnostic) = Diagnostic::parse(text) {
        return format!(
            "{}:{}:{}: {}",
            diagnostic.file, diagnostic.line, diagnostic.column, diagnostic.message
        );
    }

    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARSE_ERROR: &str =
        "\n--> dir/bad.rego:5:1\n  |\n5 | }\n  | ^\nerror: expecting expression";

    #[test]
    fn parse_reads_file_line_column_and_message() {
        let diagnostic = Diagnostic::parse(PARSE_ERROR).expect("located error");

        assert_eq!(diagnostic.file, "dir/bad.rego");
        assert_eq!(diagnostic.line, 5);
        assert_eq!(diagnostic.column, 1);
        assert_eq!(diagnostic.message, "expecting expression");
    }

    #[test]
    fn parse_keeps_colons_in_file_name() {
        let text = "\n--> c:/x/p.rego:12:7\n  |\nerror: var z is unsafe";

        let diagnostic = Diagnostic::parse(text).expect("located error");

        assert_eq!(diagnostic.file, "c:/x/p.rego");
        assert_eq!(diagnostic.line, 12);
        assert_eq!(diagnostic.column, 7);
        assert_eq!(diagnostic.message, "var z is unsafe");
    }

    #[test]
    fn parse_without_location_is_none() {
        assert_eq!(Diagnostic::parse("not a valid rule path"), None);
    }

    #[test]
    fn one_line_joins_unlocated_text() {
        assert_eq!(one_line("  data\n must be object "), "data must be object");
        assert_eq!(
            one_line(PARSE_ERROR),
            "dir/bad.rego:5:1: expecting expression"
        );
    }
}
