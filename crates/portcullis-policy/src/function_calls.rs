//! Static check that every function call in the loaded modules names a defined function.
//!
//! regorus 0.14.1 looks a function up only when evaluation reaches the call, so a misspelt
//! name in a rule that no request has reached yet passes compilation and later fails
//! requests. OPA's type checker rejects the same module at compile time. This check applies
//! OPA's name resolution to every call in every module:
//!
//! 1. A call whose name starts with `data` names that path.
//! 2. Otherwise, when the first component is an import alias of the module, the alias is
//!    replaced by the import's path (`import data.lib` turns `lib.f(x)` into
//!    `data.lib.f`). `future.keywords` and `rego.v1` imports bind no alias.
//! 3. Otherwise, when the first component is the name of a rule in the module's package,
//!    the call names a path in that package, even if a builtin namespace has the same name
//!    (a rule `json := …` turns `json.marshal(x)` into `data.<package>.json.marshal`).
//! 4. Otherwise the call names a builtin.
//!
//! A call that resolves into the data document must name a function rule (a `default`
//! function counts), and a builtin call must name a builtin that regorus implements.
//!
//! The check reads the parsed modules through `regorus::unstable` and the hidden
//! `Engine::get_modules`, which regorus documents as likely to change, so a regorus upgrade
//! may need this module updated.

use std::collections::{HashMap, HashSet};

use regorus::unstable::{BUILTINS, Expr, Literal, Module, Query, Ref, Rule, RuleHead, Span};

use crate::error::PolicyError;

/// Names of the builtins that OPA 1.22.4 lists in `opa capabilities` and regorus 0.14.1,
/// with the features this workspace enables, does not implement.
///
/// A call to one of them is reported as unsupported rather than undefined, because the name
/// is right for OPA. The list includes the names of infix operators (`plus`, `equal`),
/// which OPA also accepts in call form, and OPA's deprecated builtins (`any`, `re_match`).
/// `print` is missing from regorus's builtin table but its interpreter implements it.
const OPA_BUILTINS_MISSING_FROM_REGORUS: &[&str] = &[
    "all",
    "and",
    "any",
    "array.flatten",
    "assign",
    "cast_array",
    "cast_boolean",
    "cast_null",
    "cast_object",
    "cast_set",
    "cast_string",
    "crypto.hmac.equal",
    "crypto.hmac.md5",
    "crypto.hmac.sha1",
    "crypto.hmac.sha256",
    "crypto.hmac.sha512",
    "crypto.md5",
    "crypto.parse_private_keys",
    "crypto.sha1",
    "crypto.sha256",
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "crypto.x509.parse_certificate_request",
    "crypto.x509.parse_certificates",
    "crypto.x509.parse_keypair",
    "crypto.x509.parse_rsa_private_key",
    "div",
    "eq",
    "equal",
    "graphql.is_valid",
    "graphql.parse",
    "graphql.parse_and_verify",
    "graphql.parse_query",
    "graphql.parse_schema",
    "graphql.schema_is_valid",
    "gt",
    "gte",
    "internal.member_2",
    "internal.member_3",
    "internal.print",
    "internal.template_string",
    "internal.test_case",
    "io.jwt.decode",
    "io.jwt.decode_verify",
    "io.jwt.encode_sign",
    "io.jwt.encode_sign_raw",
    "io.jwt.verify_eddsa",
    "io.jwt.verify_es256",
    "io.jwt.verify_es384",
    "io.jwt.verify_es512",
    "io.jwt.verify_hs256",
    "io.jwt.verify_hs384",
    "io.jwt.verify_hs512",
    "io.jwt.verify_ps256",
    "io.jwt.verify_ps384",
    "io.jwt.verify_ps512",
    "io.jwt.verify_rs256",
    "io.jwt.verify_rs384",
    "io.jwt.verify_rs512",
    "lt",
    "lte",
    "minus",
    "mul",
    "neq",
    "net.cidr_contains_matches",
    "net.cidr_intersects",
    "net.cidr_merge",
    "net.cidr_overlap",
    "net.lookup_ip_addr",
    "or",
    "plus",
    "providers.aws.sign_req",
    "re_match",
    "regex.globs_match",
    "rego.metadata.chain",
    "rego.metadata.rule",
    "rego.parse_module",
    "rem",
    "set_diff",
    "strings.render_template",
    "strings.split_n",
    "uri.is_valid",
    "uri.parse",
];

/// A reference split into its components, such as `["data", "lib", "f"]`.
type Path = Vec<String>;

/// Rejects the first call that names no defined function, taking modules in `modules`
/// order and calls in source order within a module.
pub(crate) fn check_function_calls(modules: &[Ref<Module>]) -> Result<(), PolicyError> {
    let definitions = Definitions::collect(modules);

    for module in modules {
        let Some(scope) = ModuleScope::new(module, &definitions) else {
            continue;
        };

        let mut functions = collect_called_functions(module);
        functions.sort_by_key(|function| {
            let start = reference_start(function);
            (start.line, start.col)
        });
        for function in functions {
            scope
                .resolve(function)
                .map_err(|failure| failure.into_error(reference_start(function)))?;
        }
    }
    Ok(())
}

/// The functions and rule names that the modules define.
struct Definitions {
    /// Full paths of function rules, `default` functions included.
    functions: HashSet<Path>,
    /// The first component of each rule's name, per package path.
    rule_roots: HashMap<Path, HashSet<String>>,
}

impl Definitions {
    fn collect(modules: &[Ref<Module>]) -> Definitions {
        let mut definitions = Definitions {
            functions: HashSet::new(),
            rule_roots: HashMap::new(),
        };

        for module in modules {
            let Some(package) = package_path(module) else {
                continue;
            };
            for rule in &module.policy {
                let (name, is_function) = match rule.as_ref() {
                    Rule::Spec {
                        head: RuleHead::Func { refr, .. },
                        ..
                    } => (refr, true),
                    Rule::Spec {
                        head: RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. },
                        ..
                    } => (refr, false),
                    Rule::Default { refr, args, .. } => (refr, !args.is_empty()),
                };

                if let Some(root) = root_name(name) {
                    definitions
                        .rule_roots
                        .entry(package.clone())
                        .or_default()
                        .insert(root.to_string());
                }
                if is_function && let Some(relative) = static_path(name) {
                    let mut full = package.clone();
                    full.extend(relative);
                    definitions.functions.insert(full);
                }
            }
        }
        definitions
    }
}

/// The names a call in one module can resolve to: its package, its imports and the
/// functions of all modules.
struct ModuleScope<'a> {
    package: Path,
    /// Import aliases and the paths they refer to.
    aliases: HashMap<String, Path>,
    package_rule_roots: Option<&'a HashSet<String>>,
    functions: &'a HashSet<Path>,
}

/// The reason a call failed to resolve, with the function name to report.
#[derive(Debug, PartialEq, Eq)]
enum CallFailure {
    Undefined(String),
    UnsupportedBuiltin(String),
}

impl CallFailure {
    fn into_error(self, span: &Span) -> PolicyError {
        let file = span.source.file().clone();
        match self {
            CallFailure::Undefined(function) => PolicyError::UndefinedFunction {
                file,
                line: span.line,
                column: span.col,
                function,
            },
            CallFailure::UnsupportedBuiltin(function) => PolicyError::UnsupportedBuiltin {
                file,
                line: span.line,
                column: span.col,
                function,
            },
        }
    }
}

impl<'a> ModuleScope<'a> {
    /// Returns `None` for a module whose package name has a computed component, which the
    /// parser does not produce.
    fn new(module: &Module, definitions: &'a Definitions) -> Option<ModuleScope<'a>> {
        let package = package_path(module)?;

        let mut aliases = HashMap::new();
        for import in &module.imports {
            let Some(target) = static_path(&import.refr) else {
                continue;
            };
            if matches!(target.first().map(String::as_str), Some("future" | "rego")) {
                continue;
            }
            let alias = match &import.r#as {
                Some(alias) => alias.text().to_string(),
                None => target.last().cloned().unwrap_or_default(),
            };
            aliases.insert(alias, target);
        }

        Some(ModuleScope {
            package_rule_roots: definitions.rule_roots.get(&package),
            package,
            aliases,
            functions: &definitions.functions,
        })
    }

    /// Resolves the name of one call, the `function` of an `Expr::Call`.
    fn resolve(&self, function: &Expr) -> Result<(), CallFailure> {
        // A computed component (`data.lib[name](x)`) can name no function, and OPA rejects
        // it as undefined too. regorus 0.14.1 already fails to parse such calls.
        let Some(name) = static_path(function) else {
            return Err(CallFailure::Undefined(function.span().text().to_string()));
        };
        let root = name.first().map_or("", String::as_str);

        let resolved = if root == "data" {
            Some(name.clone())
        } else if let Some(target) = self.aliases.get(root) {
            Some(join_paths(target, name.get(1..).unwrap_or_default()))
        } else if self
            .package_rule_roots
            .is_some_and(|roots| roots.contains(root))
        {
            Some(join_paths(&self.package, &name))
        } else {
            None
        };

        match resolved {
            Some(path) if self.functions.contains(&path) => Ok(()),
            Some(path) => Err(CallFailure::Undefined(render_path(&path))),
            None => check_builtin(render_path(&name)),
        }
    }
}

fn check_builtin(name: String) -> Result<(), CallFailure> {
    if name == "print" || BUILTINS.contains_key(name.as_str()) {
        Ok(())
    } else if OPA_BUILTINS_MISSING_FROM_REGORUS.contains(&name.as_str()) {
        Err(CallFailure::UnsupportedBuiltin(name))
    } else {
        Err(CallFailure::Undefined(name))
    }
}

/// A part of a module still to be searched for calls.
enum Node<'m> {
    Expr(&'m Expr),
    Query(&'m Query),
}

/// Returns the function reference of every call in `module`, found without recursion so
/// that deeply nested expressions cannot overflow the stack.
fn collect_called_functions(module: &Module) -> Vec<&Expr> {
    let mut pending: Vec<Node<'_>> = Vec::new();
    for rule in &module.policy {
        match rule.as_ref() {
            Rule::Spec { head, bodies, .. } => {
                match head {
                    RuleHead::Compr { refr, assign, .. } => {
                        pending.push(Node::Expr(refr));
                        pending.extend(assign.iter().map(|assign| Node::Expr(&assign.value)));
                    }
                    RuleHead::Set { refr, key, .. } => {
                        pending.push(Node::Expr(refr));
                        pending.extend(key.iter().map(|key| Node::Expr(key)));
                    }
                    RuleHead::Func {
                        refr, args, assign, ..
                    } => {
                        pending.push(Node::Expr(refr));
                        pending.extend(args.iter().map(|arg| Node::Expr(arg)));
                        pending.extend(assign.iter().map(|assign| Node::Expr(&assign.value)));
                    }
                }
                for body in bodies {
                    pending.extend(body.assign.iter().map(|assign| Node::Expr(&assign.value)));
                    pending.push(Node::Query(&body.query));
                }
            }
            Rule::Default {
                refr, args, value, ..
            } => {
                pending.push(Node::Expr(refr));
                pending.extend(args.iter().map(|arg| Node::Expr(arg)));
                pending.push(Node::Expr(value));
            }
        }
    }

    let mut calls = Vec::new();
    while let Some(node) = pending.pop() {
        match node {
            Node::Query(query) => {
                for statement in &query.stmts {
                    match &statement.literal {
                        Literal::SomeVars { .. } => {}
                        Literal::SomeIn {
                            key,
                            value,
                            collection,
                            ..
                        } => {
                            pending.extend(key.iter().map(|key| Node::Expr(key)));
                            pending.push(Node::Expr(value));
                            pending.push(Node::Expr(collection));
                        }
                        Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => {
                            pending.push(Node::Expr(expr));
                        }
                        Literal::Every { domain, query, .. } => {
                            pending.push(Node::Expr(domain));
                            pending.push(Node::Query(query));
                        }
                    }
                    for modifier in &statement.with_mods {
                        pending.push(Node::Expr(&modifier.refr));
                        pending.push(Node::Expr(&modifier.r#as));
                    }
                }
            }
            Node::Expr(expr) => {
                if let Expr::Call { fcn, .. } = expr {
                    calls.push(fcn.as_ref());
                }
                push_children(expr, &mut pending);
            }
        }
    }
    calls
}

/// Pushes the subexpressions and queries of `expr` onto `pending`.
fn push_children<'m>(expr: &'m Expr, pending: &mut Vec<Node<'m>>) {
    match expr {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            pending.extend(items.iter().map(|item| Node::Expr(item)));
        }
        Expr::Object { fields, .. } => {
            for (_, key, value) in fields {
                pending.push(Node::Expr(key));
                pending.push(Node::Expr(value));
            }
        }
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            pending.push(Node::Expr(term));
            pending.push(Node::Query(query));
        }
        Expr::ObjectCompr {
            key, value, query, ..
        } => {
            pending.push(Node::Expr(key));
            pending.push(Node::Expr(value));
            pending.push(Node::Query(query));
        }
        Expr::Call { fcn, params, .. } => {
            pending.push(Node::Expr(fcn));
            pending.extend(params.iter().map(|param| Node::Expr(param)));
        }
        Expr::UnaryExpr { expr, .. } => pending.push(Node::Expr(expr)),
        Expr::RefDot { refr, .. } => pending.push(Node::Expr(refr)),
        Expr::RefBrack { refr, index, .. } => {
            pending.push(Node::Expr(refr));
            pending.push(Node::Expr(index));
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            pending.push(Node::Expr(lhs));
            pending.push(Node::Expr(rhs));
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            pending.extend(key.iter().map(|key| Node::Expr(key)));
            pending.push(Node::Expr(value));
            pending.push(Node::Expr(collection));
        }
    }
}

/// Returns the package of `module` as a path that starts with `data`.
fn package_path(module: &Module) -> Option<Path> {
    let mut path = vec!["data".to_string()];
    path.extend(static_path(&module.package.refr)?);
    Some(path)
}

/// Splits a reference such as `data.lib["x"].f` into its components, or returns `None`
/// when a component is computed (`lib[name]`) or `expr` is not a reference.
fn static_path(expr: &Expr) -> Option<Path> {
    let mut reversed = Vec::new();
    let mut node = expr;
    loop {
        match node {
            Expr::Var { span, .. } => {
                reversed.push(span.text().to_string());
                break;
            }
            Expr::RefDot { refr, field, .. } => {
                reversed.push(field.0.text().to_string());
                node = refr;
            }
            Expr::RefBrack { refr, index, .. } => {
                let component = match index.as_ref() {
                    Expr::String { value, .. } | Expr::RawString { value, .. } => {
                        value.as_string().ok()?.to_string()
                    }
                    _ => return None,
                };
                reversed.push(component);
                node = refr;
            }
            _ => return None,
        }
    }
    reversed.reverse();
    Some(reversed)
}

/// Returns the variable a reference starts with: `a` for `a.b[x]`.
fn root_name(expr: &Expr) -> Option<&str> {
    match root_var(expr) {
        Some(Expr::Var { span, .. }) => Some(span.text()),
        _ => None,
    }
}

/// Returns the span of the first token of a reference. regorus places the span of
/// `json.marshal` at the last `.`, which would point past the start of the name.
fn reference_start(expr: &Expr) -> &Span {
    root_var(expr).unwrap_or(expr).span()
}

fn root_var(expr: &Expr) -> Option<&Expr> {
    let mut node = expr;
    loop {
        match node {
            Expr::Var { .. } => return Some(node),
            Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => node = refr,
            _ => return None,
        }
    }
}

fn join_paths(prefix: &[String], suffix: &[String]) -> Path {
    prefix.iter().chain(suffix).cloned().collect()
}

/// Formats a path the way regorus and OPA print references: identifier components after a
/// dot, any other component as a bracketed JSON string (`data.envoy["ext-authz"].f`).
fn render_path(path: &[String]) -> String {
    let mut rendered = String::new();
    for (index, component) in path.iter().enumerate() {
        if is_identifier(component) {
            if index > 0 {
                rendered.push('.');
            }
            rendered.push_str(component);
        } else {
            rendered.push('[');
            rendered.push_str(&serde_json::Value::from(component.as_str()).to_string());
            rendered.push(']');
        }
    }
    rendered
}

fn is_identifier(component: &str) -> bool {
    let mut bytes = component.bytes();
    bytes
        .next()
        .is_some_and(|first| first == b'_' || first.is_ascii_alphabetic())
        && bytes.all(|next| next == b'_' || next.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opa_only_builtins_are_missing_from_regorus() {
        for name in OPA_BUILTINS_MISSING_FROM_REGORUS {
            assert!(
                !BUILTINS.contains_key(name),
                "regorus now implements {name}; remove it from OPA_BUILTINS_MISSING_FROM_REGORUS"
            );
        }
    }

    #[test]
    fn opa_only_builtins_are_sorted_and_unique() {
        let mut sorted = OPA_BUILTINS_MISSING_FROM_REGORUS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();

        assert_eq!(sorted, OPA_BUILTINS_MISSING_FROM_REGORUS);
    }

    #[test]
    fn render_path_brackets_non_identifiers() {
        let path = ["data", "envoy", "ext-authz", "_f1"].map(String::from);

        assert_eq!(render_path(&path), r#"data.envoy["ext-authz"]._f1"#);
    }

    #[test]
    fn builtin_lookup_separates_unsupported_from_undefined() {
        assert_eq!(check_builtin("json.marshal".into()), Ok(()));
        assert_eq!(check_builtin("print".into()), Ok(()));
        assert_eq!(
            check_builtin("io.jwt.decode".into()),
            Err(CallFailure::UnsupportedBuiltin("io.jwt.decode".into()))
        );
        assert_eq!(
            check_builtin("json.marshall".into()),
            Err(CallFailure::Undefined("json.marshall".into()))
        );
    }
}
