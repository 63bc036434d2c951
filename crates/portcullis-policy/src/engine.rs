//! Building a regorus engine from a bundle: modules, data and the checks OPA applies.

use regorus::Engine;

use crate::bundle::{Bundle, BundleModule, RegoVersion, roots_contain};
use crate::diagnostic::{Diagnostic, one_line};
use crate::error::PolicyError;

/// Maximum nesting of `[` and `{` in a policy module.
///
/// regorus 0.14.1 parses nested array, set and object literals in time that doubles with
/// each level (in a debug build, one 25-level array literal took over a minute), so deeper
/// modules are rejected before they reach the parser. 16 levels leave room for realistic
/// literals.
pub const MAX_BRACKET_NESTING: usize = 16;

/// Creates an engine with the bundle's data and its modules (tests only when asked).
///
/// The manifest's `rego_version`, when present, wins over `rego_v0`, because the bundle
/// author declared the syntax of the files.
pub(crate) fn build_engine(
    bundle: &Bundle,
    rego_v0: bool,
    include_tests: bool,
) -> Result<Engine, PolicyError> {
    let mut engine = Engine::new();
    let use_v0 = match bundle.rego_version() {
        Some(RegoVersion::V0) => true,
        Some(RegoVersion::V1) => false,
        None => rego_v0,
    };
    engine.set_rego_v0(use_v0);
    // OPA turns a builtin error (such as `urlquery.decode("%")`) into an undefined
    // expression unless asked to be strict; regorus raises by default. Policies written
    // for OPA rely on OPA's behaviour.
    engine.set_strict_builtin_errors(false);

    for module in bundle.modules() {
        if module.is_test() && !include_tests {
            continue;
        }
        add_module(&mut engine, module)?;
    }
    check_package_roots(&engine, bundle.roots())?;

    let data: regorus::Value = serde_json::from_value(bundle.data().clone()).map_err(|error| {
        PolicyError::InvalidData {
            message: error.to_string(),
        }
    })?;
    engine
        .add_data(data)
        .map_err(|error| PolicyError::InvalidData {
            message: one_line(&error.to_string()),
        })?;

    Ok(engine)
}

fn add_module(engine: &mut Engine, module: &BundleModule) -> Result<(), PolicyError> {
    check_bracket_nesting(module)?;

    engine
        .add_policy(module.path().to_string(), module.source().to_string())
        .map_err(|error| {
            let text = error.to_string();
            match Diagnostic::parse(&text) {
                Some(diagnostic) => PolicyError::Parse {
                    file: diagnostic.file,
                    line: diagnostic.line,
                    column: diagnostic.column,
                    message: diagnostic.message,
                },
                None => PolicyError::Load {
                    file: module.path().to_string(),
                    message: one_line(&text),
                },
            }
        })?;
    Ok(())
}

/// Rejects modules whose `[`/`{` nesting exceeds [`MAX_BRACKET_NESTING`], skipping strings,
/// raw strings and comments.
fn check_bracket_nesting(module: &BundleModule) -> Result<(), PolicyError> {
    enum State {
        Code,
        String { escaped: bool },
        RawString,
        Comment,
    }

    let mut state = State::Code;
    let mut depth = 0usize;
    let mut line = 1u32;
    for byte in module.source().bytes() {
        if byte == b'\n' {
            line = line.saturating_add(1);
        }
        state = match state {
            State::Code => match byte {
                b'#' => State::Comment,
                b'"' => State::String { escaped: false },
                b'`' => State::RawString,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_BRACKET_NESTING {
                        return Err(PolicyError::TooDeep {
                            file: module.path().to_string(),
                            line,
                            limit: MAX_BRACKET_NESTING,
                        });
                    }
                    State::Code
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    State::Code
                }
                _ => State::Code,
            },
            State::String { escaped: true } => State::String { escaped: false },
            State::String { escaped: false } => match byte {
                b'\\' => State::String { escaped: true },
                b'"' | b'\n' => State::Code,
                _ => State::String { escaped: false },
            },
            State::RawString => match byte {
                b'`' => State::Code,
                _ => State::RawString,
            },
            State::Comment => match byte {
                b'\n' => State::Code,
                _ => State::Comment,
            },
        };
    }
    Ok(())
}

/// Checks each module's package against the manifest roots, as OPA does when it
/// activates a bundle.
fn check_package_roots(engine: &Engine, roots: &[String]) -> Result<(), PolicyError> {
    let packages = engine
        .get_policy_package_components()
        .map_err(|error| PolicyError::Check {
            message: one_line(&error.to_string()),
        })?;

    for package in packages {
        let path = package.components.join("/");
        if !roots_contain(roots, &path) {
            return Err(PolicyError::PackageOutsideRoots {
                file: package.source_file,
                package: format!("data.{}", package.components.join(".")),
                roots: roots.to_vec(),
            });
        }
    }
    Ok(())
}

/// Returns `data.<package>` for every module, for error messages.
pub(crate) fn package_names(engine: &Engine) -> Vec<String> {
    let mut names = engine.get_packages().unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(source: &str) -> BundleModule {
        BundleModule::new("p.rego", source)
    }

    #[test]
    fn nesting_at_limit_is_accepted() {
        let literal = format!("{}1{}", "[".repeat(16), "]".repeat(16));

        assert!(check_bracket_nesting(&module(&format!("package p\nx := {literal}\n"))).is_ok());
    }

    #[test]
    fn nesting_past_limit_is_rejected_with_line() {
        let literal = format!("{}1{}", "{\"a\": ".repeat(17), "}".repeat(17));

        let error =
            check_bracket_nesting(&module(&format!("package p\n\nx := {literal}\n"))).unwrap_err();

        assert_eq!(
            error.to_string(),
            "policy module p.rego nests expressions deeper than 16 levels at line 3"
        );
    }

    #[test]
    fn brackets_in_strings_and_comments_are_ignored() {
        let source = format!(
            "package p\n# {}\nx := \"{}\\\"\"\ny := `{}`\n",
            "[".repeat(40),
            "{".repeat(40),
            "[".repeat(40)
        );

        assert!(check_bracket_nesting(&module(&source)).is_ok());
    }
}
