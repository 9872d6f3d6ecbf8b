//! Static checks of a pack, so that what loads can run: source limits checked before the parser
//! sees a file, and, on the parsed modules, recursion, references to packages or lists that do
//! not exist, and calls to functions that are neither builtins nor defined by the pack.
//!
//! Recursion must be found here: the register VM recurses on the native stack, so a rule that
//! depends on itself would abort the process, not fail an evaluation.
use std::collections::{BTreeMap, BTreeSet};

use regorus::unstable::{Expr, Literal, LiteralStmt, Module, Query, Rule, RuleHead};

use super::diag::Diagnostic;
use super::pack::location;

/// Largest rule or test file. Rule files are small (the default pack's largest is 5 KiB).
pub const MAX_SOURCE_BYTES: u64 = 256 * 1024;
/// Largest list file.
pub const MAX_LIST_BYTES: u64 = 1024 * 1024;
/// All files of a pack together.
pub const MAX_PACK_BYTES: u64 = 8 * 1024 * 1024;
/// Files in a pack.
pub const MAX_PACK_FILES: usize = 1000;
/// Deepest bracket nesting (`(`, `[`, `{`) in a rule file. The parser's time doubles with each
/// level (depth 16 takes seconds); the default pack's deepest is 7.
pub const MAX_NESTING: usize = 10;

/// Functions that exist but have no place in a rule evaluated on every event.
const DENIED_FUNCTIONS: [(&str, &str); 4] = [
    ("print", "rules have no output stream in the daemon; say it in the alert message"),
    ("http.send", "it reaches the network from the rule engine"),
    ("net.lookup_ip_addr", "it resolves names over the network from the rule engine"),
    ("opa.runtime", "it exposes the daemon's environment to rules"),
];

/// The widest `numbers.range` / `numbers.range_step` a rule may ask for. regorus builds the
/// whole array in one builtin call, before any instruction or time budget can stop it (and
/// reserves it up front: `numbers.range(1, 1e12)` would abort the daemon on allocation), so
/// the bounds must be literals at most this far apart.
pub const MAX_RANGE: u64 = 10_000;

/// Builtins that fail on an argument they cannot take (`to_number("bash")`, a malformed
/// duration, invalid base64 or JSON). The tree interpreter raises an error; regorus' register
/// VM, the daemon's engine, makes the expression undefined instead (as OPA does), so the rule
/// body silently does not hold. A pack calling them loads with a warning naming each call.
pub const ERROR_PRONE_BUILTINS: [&str; 14] = [
    "to_number",
    "units.parse",
    "units.parse_bytes",
    "json.unmarshal",
    "yaml.unmarshal",
    "base64.decode",
    "base64url.decode",
    "hex.decode",
    "urlquery.decode",
    "time.parse_ns",
    "time.parse_rfc3339_ns",
    "time.parse_duration_ns",
    "semver.compare",
    "net.cidr_contains",
];

/// Checks a source text before parsing: bracket nesting (strings and comments skipped).
pub fn check_source_text(file: &str, text: &str) -> Option<Diagnostic> {
    let (mut depth, mut line, mut col) = (0usize, 1u32, 0u32);
    let mut chars = text.chars();
    // None: code; Some('"'): string; Some('`'): raw string; Some('#'): comment.
    let mut state: Option<char> = None;
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            col = 0;
        } else {
            col += 1;
        }
        match state {
            Some('"') => match c {
                '\\' => {
                    let _ = chars.next();
                    col += 1;
                }
                '"' | '\n' => state = None,
                _ => {}
            },
            Some('`') if c == '`' => state = None,
            Some('#') if c == '\n' => state = None,
            Some(_) => {}
            None => match c {
                '"' | '`' | '#' => state = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Some(Diagnostic::new(
                            file,
                            line,
                            col,
                            format!(
                                "nesting deeper than {MAX_NESTING} levels of brackets: split the value into named parts (the parser's time doubles with each level)"
                            ),
                        ));
                    }
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    None
}

type Modules = [regorus::unstable::Ref<Module>];

/// A rule (or function) of the pack: where it is defined first.
struct RuleDef {
    file: String,
    line: u32,
    col: u32,
}

/// The checks on parsed modules. `list_names` are the stems of the pack's list files
/// (`data.palisade.lists.<name>`).
pub fn check_modules(modules: &Modules, list_names: &BTreeSet<String>) -> Vec<Diagnostic> {
    let mut defs: BTreeMap<String, RuleDef> = BTreeMap::new();
    for module in modules {
        let package = package_path(module);
        for rule in &module.policy {
            if let Some(name) = rule_name(rule) {
                let here = location(rule.span());
                defs.entry(format!("{package}.{name}"))
                    .or_insert(RuleDef { file: here.file, line: here.line, col: here.col });
            }
        }
    }
    let mut data_paths: BTreeSet<String> = defs.keys().cloned().collect();
    data_paths.extend(list_names.iter().map(|n| format!("{}.{n}", super::pack::LISTS_PATH)));

    let walker = walk(modules, &defs, &data_paths);
    let mut diagnostics = walker.diagnostics;
    diagnostics.extend(find_cycles(&defs, &walker.edges));
    diagnostics
}

/// What loads but deserves the author's attention: calls of error-prone builtins (see
/// `ERROR_PRONE_BUILTINS`). Run on modules `check_modules` accepted.
pub fn check_warnings(modules: &Modules) -> Vec<Diagnostic> {
    let (defs, data_paths) = (BTreeMap::new(), BTreeSet::new());
    walk(modules, &defs, &data_paths).warnings
}

fn walk<'a>(modules: &Modules, defs: &'a BTreeMap<String, RuleDef>, data_paths: &'a BTreeSet<String>) -> Walker<'a> {
    let mut walker = Walker { defs, data_paths, diagnostics: Vec::new(), warnings: Vec::new(), edges: BTreeMap::new() };
    for module in modules {
        walker.module(module);
    }
    walker
}

/// A literal integer argument.
fn literal_integer(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::Number { value, .. } => value.as_i64().ok(),
        Expr::UnaryExpr { expr, .. } => literal_integer(expr).map(|v| -v),
        _ => None,
    }
}

fn package_path(module: &Module) -> String {
    format!("data.{}", module.package.refr.span().text())
}

/// The name a rule defines, up to its first bracket (`a.b[x]` defines `a.b`).
fn rule_name(rule: &Rule) -> Option<String> {
    let refr = match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } | RuleHead::Func { refr, .. } => refr,
        },
        Rule::Default { refr, .. } => refr,
    };
    let text = refr.span().text();
    let name = text.split('[').next().unwrap_or(text).trim();
    (!name.is_empty()).then(|| name.to_string())
}

struct Walker<'a> {
    defs: &'a BTreeMap<String, RuleDef>,
    /// Every path something defines: rules and lists.
    data_paths: &'a BTreeSet<String>,
    diagnostics: Vec<Diagnostic>,
    /// Problems that do not stop the pack from loading.
    warnings: Vec<Diagnostic>,
    /// Rule path -> rule paths it refers to.
    edges: BTreeMap<String, BTreeSet<String>>,
}

/// What names mean inside one module.
struct Scope {
    package: String,
    /// Import alias -> path (`lists` -> `data.palisade.lists`).
    aliases: BTreeMap<String, String>,
    /// The rule being walked.
    current: String,
}

impl Walker<'_> {
    fn module(&mut self, module: &Module) {
        let package = package_path(module);
        let mut aliases = BTreeMap::new();
        for import in &module.imports {
            let path = import.refr.span().text().to_string();
            let alias = match &import.r#as {
                Some(span) => span.text().to_string(),
                None => path.rsplit('.').next().unwrap_or(&path).to_string(),
            };
            if path.starts_with("data.") && !self.defined(&path) {
                self.diagnostics.push(Diagnostic::at(
                    &location(&import.span),
                    format!("import {path}: no rule package or list defines it (rules are packages palisade.rules.<id>, lists are lists/<name>.yaml)"),
                ));
            }
            aliases.insert(alias, path);
        }
        let mut scope = Scope { package, aliases, current: String::new() };
        for rule in &module.policy {
            let Some(name) = rule_name(rule) else { continue };
            scope.current = format!("{}.{name}", scope.package);
            match rule.as_ref() {
                Rule::Spec { head, bodies, .. } => {
                    match head {
                        RuleHead::Compr { refr, assign, .. } => {
                            self.head_ref(refr, &scope);
                            if let Some(assign) = assign {
                                self.expr(&assign.value, &scope);
                            }
                        }
                        RuleHead::Set { refr, key, .. } => {
                            self.head_ref(refr, &scope);
                            if let Some(key) = key {
                                self.expr(key, &scope);
                            }
                        }
                        RuleHead::Func { args, assign, .. } => {
                            for arg in args {
                                self.expr(arg, &scope);
                            }
                            if let Some(assign) = assign {
                                self.expr(&assign.value, &scope);
                            }
                        }
                    }
                    for body in bodies {
                        if let Some(assign) = &body.assign {
                            self.expr(&assign.value, &scope);
                        }
                        self.query(&body.query, &scope);
                    }
                }
                Rule::Default { args, value, .. } => {
                    for arg in args {
                        self.expr(arg, &scope);
                    }
                    self.expr(value, &scope);
                }
            }
        }
    }

    /// Brackets in a rule head (`deny[x]`) may refer to other rules.
    fn head_ref(&mut self, refr: &Expr, scope: &Scope) {
        if let Expr::RefBrack { index, refr, .. } = refr {
            self.expr(index, scope);
            self.head_ref(refr, scope);
        }
    }

    fn query(&mut self, query: &Query, scope: &Scope) {
        for stmt in &query.stmts {
            self.stmt(stmt, scope);
        }
    }

    fn stmt(&mut self, stmt: &LiteralStmt, scope: &Scope) {
        match &stmt.literal {
            Literal::SomeVars { .. } => {}
            Literal::SomeIn { key, value, collection, .. } => {
                if let Some(key) = key {
                    self.expr(key, scope);
                }
                self.expr(value, scope);
                self.expr(collection, scope);
            }
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => self.expr(expr, scope),
            Literal::Every { domain, query, .. } => {
                self.expr(domain, scope);
                self.query(query, scope);
            }
        }
        for with in &stmt.with_mods {
            self.expr(&with.r#as, scope);
        }
    }

    fn expr(&mut self, expr: &Expr, scope: &Scope) {
        match expr {
            Expr::String { .. } | Expr::RawString { .. } | Expr::Number { .. } | Expr::Bool { .. } | Expr::Null { .. } => {}
            Expr::Var { .. } | Expr::RefDot { .. } | Expr::RefBrack { .. } => self.reference(expr, scope),
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                for item in items {
                    self.expr(item, scope);
                }
            }
            Expr::Object { fields, .. } => {
                for (_, key, value) in fields {
                    self.expr(key, scope);
                    self.expr(value, scope);
                }
            }
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                self.expr(term, scope);
                self.query(query, scope);
            }
            Expr::ObjectCompr { key, value, query, .. } => {
                self.expr(key, scope);
                self.expr(value, scope);
                self.query(query, scope);
            }
            Expr::Call { fcn, params, span, .. } => {
                self.call(span, fcn, scope);
                self.builtin_limits(span, fcn, params);
                for param in params {
                    self.expr(param, scope);
                }
            }
            Expr::UnaryExpr { expr, .. } => self.expr(expr, scope),
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                self.expr(lhs, scope);
                self.expr(rhs, scope);
            }
            Expr::Membership { key, value, collection, .. } => {
                if let Some(key) = key {
                    self.expr(key, scope);
                }
                self.expr(value, scope);
                self.expr(collection, scope);
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// A reference chain: its static part names a rule, a package, a list or nothing of ours.
    fn reference(&mut self, expr: &Expr, scope: &Scope) {
        // Dynamic brackets may themselves refer to rules.
        let mut cursor = expr;
        let mut fields = Vec::new();
        let base = loop {
            match cursor {
                Expr::RefDot { refr, field, .. } => {
                    fields.push(field.1.as_string().map(|s| s.to_string()).ok());
                    cursor = refr;
                }
                Expr::RefBrack { refr, index, .. } => {
                    let literal = match index.as_ref() {
                        Expr::String { value, .. } | Expr::RawString { value, .. } => {
                            value.as_string().map(|s| s.to_string()).ok()
                        }
                        _ => None,
                    };
                    if literal.is_none() {
                        self.expr(index, scope);
                    }
                    fields.push(literal);
                    cursor = refr;
                }
                Expr::Var { span, .. } => break span.text().to_string(),
                other => {
                    self.expr(other, scope);
                    return;
                }
            }
        };
        fields.reverse();
        let Some(mut path) = self.resolve_var(&base, scope) else { return };
        for field in fields {
            match field {
                Some(f) => {
                    path.push('.');
                    path.push_str(&f);
                }
                None => break,
            }
        }
        if path == "data" {
            return;
        }
        if !self.defined(&path) {
            self.diagnostics.push(Diagnostic::at(
                &location(expr.span()),
                format!("{} refers to {path}, which no rule or list of the pack defines", expr.span().text()),
            ));
            return;
        }
        self.depend(&path, scope);
    }

    /// What a bare name means: an import alias, a rule of this package, `data`, or nothing of
    /// ours (a local variable, `input`).
    fn resolve_var(&self, name: &str, scope: &Scope) -> Option<String> {
        if name == "data" {
            return Some("data".to_string());
        }
        if let Some(path) = scope.aliases.get(name) {
            return path.starts_with("data.").then(|| path.clone());
        }
        let own = format!("{}.{name}", scope.package);
        self.defs.contains_key(&own).then_some(own)
    }

    /// Calls whose cost or semantics the budgets cannot cover: ranges (rejected unless small
    /// and literal) and error-prone builtins (a warning).
    fn builtin_limits(&mut self, call: &regorus::unstable::Span, fcn: &Expr, params: &[regorus::unstable::Ref<Expr>]) {
        let name = fcn.span().text();
        let at = location(call);
        if name == "numbers.range" || name == "numbers.range_step" {
            let bounds = (params.first().and_then(|p| literal_integer(p)), params.get(1).and_then(|p| literal_integer(p)));
            let problem = match bounds {
                (Some(a), Some(b)) if a.abs_diff(b) <= MAX_RANGE => None,
                (Some(a), Some(b)) => Some(format!("{name}({a}, {b}) spans {} numbers, more than the {MAX_RANGE} a rule may ask for", a.abs_diff(b) + 1)),
                _ => Some(format!("{name} needs literal bounds (at most {MAX_RANGE} apart)")),
            };
            if let Some(problem) = problem {
                self.diagnostics.push(Diagnostic::at(
                    &at,
                    format!("{problem}: the engine builds the whole range in one step, before any budget can stop it"),
                ));
            }
        }
        if ERROR_PRONE_BUILTINS.contains(&name) {
            self.warnings.push(Diagnostic::at(
                &at,
                format!(
                    "{name} fails on an argument it cannot take: the daemon's register VM then makes the expression undefined (the body does not hold, no alert, no rule_error) where the tree interpreter raises an error; check the argument first (e.g. regex.match before to_number) and cover it with a fixture"
                ),
            ));
        }
    }

    fn call(&mut self, call: &regorus::unstable::Span, fcn: &Expr, scope: &Scope) {
        let at = location(call);
        let name = fcn.span().text().to_string();
        let (base, rest) = match name.split_once('.') {
            Some((base, rest)) => (base, Some(rest)),
            None => (name.as_str(), None),
        };
        let resolved = self.resolve_var(base, scope).map(|p| match rest {
            Some(rest) => format!("{p}.{rest}"),
            None => p,
        });
        if let Some(path) = resolved {
            if self.defs.contains_key(&path) {
                self.depend(&path, scope);
                return;
            }
            self.diagnostics.push(Diagnostic::at(
                &at,
                format!("unknown function {name}: {path} is not a function of the pack"),
            ));
            return;
        }
        if let Some((_, why)) = DENIED_FUNCTIONS.iter().find(|(denied, _)| *denied == name) {
            self.diagnostics.push(Diagnostic::at(&at, format!("function {name} is not allowed in rules: {why}")));
            return;
        }
        if !regorus::unstable::BUILTINS.contains_key(name.as_str()) {
            self.diagnostics.push(Diagnostic::at(
                &at,
                format!("unknown function {name}: neither a Rego builtin of palisade's engine nor a function of the pack"),
            ));
        }
    }

    /// Is `path` something the pack defines, inside it, or a package holding some of it?
    fn defined(&self, path: &str) -> bool {
        let prefix = format!("{path}.");
        self.data_paths.iter().any(|p| p == path || path.starts_with(&format!("{p}.")) || p.starts_with(&prefix))
    }

    fn depend(&mut self, path: &str, scope: &Scope) {
        let prefix = format!("{path}.");
        let targets: Vec<String> = self
            .defs
            .keys()
            .filter(|rule| *rule == path || path.starts_with(&format!("{rule}.")) || rule.starts_with(&prefix))
            .cloned()
            .collect();
        self.edges.entry(scope.current.clone()).or_default().extend(targets);
    }
}

/// Every cycle of rule dependencies, reported once at its first rule.
fn find_cycles(defs: &BTreeMap<String, RuleDef>, edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Diagnostic> {
    // Iterative depth-first search (a hostile pack must not overflow this stack either).
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let names: Vec<&String> = defs.keys().collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let successors: Vec<Vec<usize>> = names
        .iter()
        .map(|n| {
            edges.get(*n).map_or_else(Vec::new, |targets| targets.iter().filter_map(|t| index.get(t.as_str()).copied()).collect())
        })
        .collect();
    let mut marks = vec![Mark::New; names.len()];
    let mut diagnostics = Vec::new();
    let mut reported: BTreeSet<Vec<usize>> = BTreeSet::new();
    for start in 0..names.len() {
        if marks[start] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Active;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&succ) = successors[node].get(*next) {
                *next += 1;
                match marks[succ] {
                    Mark::New => {
                        marks[succ] = Mark::Active;
                        stack.push((succ, 0));
                    }
                    Mark::Active => {
                        let from = stack.iter().position(|(n, _)| *n == succ).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|(n, _)| *n).collect();
                        let mut key = cycle.clone();
                        key.sort_unstable();
                        if reported.insert(key) {
                            cycle.push(succ);
                            let first = &defs[names[cycle[0]]];
                            let chain: Vec<&str> =
                                cycle.iter().map(|&i| names[i].strip_prefix("data.").unwrap_or(names[i])).collect();
                            diagnostics.push(Diagnostic::new(
                                first.file.clone(),
                                first.line,
                                first.col,
                                format!(
                                    "recursion: {} (a rule or function may not depend on itself, directly or through others)",
                                    chain.join(" -> ")
                                ),
                            ));
                        }
                    }
                    Mark::Done => {}
                }
            } else {
                marks[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    diagnostics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings_and_comments() {
        let deep = format!("x := {}1{}", "[".repeat(MAX_NESTING + 1), "]".repeat(MAX_NESTING + 1));
        let d = check_source_text("a.rego", &format!("package p\n\n{deep}\n")).expect("too deep");
        assert_eq!((d.line, d.col), (3, 5 + MAX_NESTING as u32 + 1), "{d}");
        let quoted = format!("package p\n# {deep}\nx := \"{}\"\ny := `{}`\n", "[".repeat(40), "{".repeat(40));
        assert_eq!(check_source_text("a.rego", &quoted), None);
    }
}
