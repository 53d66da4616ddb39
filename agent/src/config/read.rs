//! Reading the parsed TOML tree: typed access to each key, with every problem (syntax, unknown
//! key, wrong type, missing key, invalid value) collected with its line instead of stopping at
//! the first.

use std::cell::RefCell;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::Problem;

/// A value and where it is in the file.
#[derive(Clone, Debug)]
pub(super) struct Val<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// The text being read, the file's directory, and the problems found so far.
pub(super) struct Cx<'a> {
    text: &'a str,
    base: &'a Path,
    problems: RefCell<Vec<Problem>>,
}

impl<'a> Cx<'a> {
    pub fn new(text: &'a str, path: &'a Path) -> Cx<'a> {
        Cx {
            text,
            base: path.parent().unwrap_or(Path::new(".")),
            problems: RefCell::new(Vec::new()),
        }
    }

    /// Records a problem at `span` (`None`: the file as a whole).
    pub fn report_at(&self, span: Option<Range<usize>>, message: impl Into<String>) {
        let line = span.map(|s| {
            let end = s.start.min(self.text.len());
            self.text
                .get(..end)
                .map_or(1, |before| before.matches('\n').count() + 1)
        });
        self.problems.borrow_mut().push(Problem {
            line,
            message: message.into(),
        });
    }

    /// Records a problem with the value `at`.
    pub fn report<T>(&self, at: &Val<T>, message: impl Into<String>) {
        self.report_at(Some(at.span.clone()), message);
    }

    /// `Some(v)` when `r` is `Ok`, else records the error with `at` and gives `None`.
    pub fn check<T, U, E: std::fmt::Display>(
        &self,
        at: &Val<U>,
        what: impl std::fmt::Display,
        r: Result<T, E>,
    ) -> Option<T> {
        r.map_err(|e| self.report(at, format!("{what}: {e}"))).ok()
    }

    /// A path from the file, relative ones resolved against the file's directory.
    pub fn path(&self, v: &Val<&str>, key: &str) -> Option<PathBuf> {
        if v.value.is_empty() {
            self.report(v, format!("`{key}` is empty: give a path"));
            return None;
        }
        Some(self.base.join(v.value))
    }

    /// The problems, in file order (problems without a line first).
    pub fn into_problems(self) -> Vec<Problem> {
        let mut p = self.problems.into_inner();
        p.sort_by(|a, b| (a.line, &a.message).cmp(&(b.line, &b.message)));
        p.dedup();
        p
    }

    pub fn has_problems(&self) -> bool {
        !self.problems.borrow().is_empty()
    }
}

/// One TOML table being read: each accessor marks its key as known; [`Table::finish`] reports
/// the keys nobody asked for.
pub(super) struct Table<'t, 'i> {
    cx: &'t Cx<'t>,
    /// Dotted name for messages (`""` for the top level, `serve.imds`, `role`, `role.file`).
    name: String,
    /// `None`: the table is absent (every key then reads as unset).
    table: Option<&'t DeTable<'i>>,
    span: Range<usize>,
    known: Vec<&'static str>,
}

impl<'t, 'i> Table<'t, 'i> {
    pub fn root(cx: &'t Cx<'t>, doc: &'t Spanned<DeTable<'i>>) -> Table<'t, 'i> {
        Table {
            cx,
            name: String::new(),
            table: Some(doc.get_ref()),
            span: doc.span(),
            known: Vec::new(),
        }
    }

    /// Where the table starts (its header).
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    fn key_name(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn entries(
        &self,
    ) -> impl Iterator<Item = (&'t Spanned<DeString<'i>>, &'t Spanned<DeValue<'i>>)> {
        self.table.into_iter().flat_map(|t| t.iter())
    }

    fn get(&mut self, key: &'static str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.known.push(key);
        self.entries()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    fn wrong_type(&self, key: &str, v: &Spanned<DeValue<'_>>, want: &str) {
        self.cx.report_at(
            Some(v.span()),
            format!(
                "`{}` must be {want}, not {}",
                self.key_name(key),
                with_article(v.get_ref().type_str())
            ),
        );
    }

    fn missing(&self, key: &str, hint: &str) {
        let at = (!self.name.is_empty()).then(|| self.span.clone());
        self.cx
            .report_at(at, format!("`{}` is missing: {hint}", self.key_name(key)));
    }

    /// Whether `key` is present (of any type).
    pub fn has(&self, key: &str) -> bool {
        self.entries().any(|(k, _)| k.get_ref().as_ref() == key)
    }

    /// An optional string.
    pub fn str(&mut self, key: &'static str) -> Option<Val<&'t str>> {
        let v = self.get(key)?;
        match v.get_ref().as_str() {
            Some(s) => Some(Val {
                value: s,
                span: v.span(),
            }),
            None => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    /// A required string (`hint` says what to put there).
    pub fn required_str(&mut self, key: &'static str, hint: &str) -> Option<Val<&'t str>> {
        if !self.has(key) {
            self.known.push(key);
            self.missing(key, hint);
            return None;
        }
        self.str(key)
    }

    /// An optional integer.
    pub fn int(&mut self, key: &'static str) -> Option<Val<i64>> {
        let v = self.get(key)?;
        self.as_int(key, v)
    }

    fn as_int(&self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<Val<i64>> {
        let Some(i) = v.get_ref().as_integer() else {
            self.wrong_type(key, v, "a whole number");
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(value) => Some(Val {
                value,
                span: v.span(),
            }),
            Err(_) => {
                self.cx.report_at(
                    Some(v.span()),
                    format!("`{}` = {i} is out of range", self.key_name(key)),
                );
                None
            }
        }
    }

    /// An optional integer from `min` to `max`, else `default`. Out of range is a problem
    /// (and gives `None`).
    pub fn int_in(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> Option<u64> {
        let Some(v) = self.int(key) else {
            // A value of the wrong type was reported; the default keeps the rest readable.
            return Some(default);
        };
        match u64::try_from(v.value) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.cx.report(
                    &v,
                    format!(
                        "{} = {}: use a whole number from {min} to {max}",
                        self.key_name(key),
                        v.value
                    ),
                );
                None
            }
        }
    }

    /// An optional list of ids (uids, gids).
    pub fn ids(&mut self, key: &'static str) -> Option<Vec<u32>> {
        let Some(v) = self.get(key) else {
            return Some(Vec::new());
        };
        let Some(items) = v.get_ref().as_array() else {
            self.wrong_type(key, v, "a list of numbers, e.g. [1000]");
            return None;
        };
        let mut ids = Vec::new();
        let mut ok = true;
        for item in items {
            match self.as_int(key, item) {
                Some(i) => match u32::try_from(i.value) {
                    Ok(id) => ids.push(id),
                    Err(_) => {
                        self.cx.report(
                            &i,
                            format!("{}: {} is not a valid id", self.key_name(key), i.value),
                        );
                        ok = false;
                    }
                },
                None => ok = false,
            }
        }
        ok.then_some(ids)
    }

    /// An optional table of strings (`parameters = { SerialNumber = "SN-1" }`), in file order;
    /// empty when absent.
    pub fn strings(&mut self, key: &'static str) -> Option<Vec<(String, String)>> {
        let Some(v) = self.get(key) else {
            return Some(Vec::new());
        };
        let Some(t) = v.get_ref().as_table() else {
            self.wrong_type(key, v, "a table of strings, e.g. { Name = \"value\" }");
            return None;
        };
        let mut out = Vec::with_capacity(t.len());
        let mut ok = true;
        for (k, item) in t.iter() {
            match item.get_ref().as_str() {
                Some(s) => out.push((k.get_ref().to_string(), s.to_string())),
                None => {
                    self.cx.report_at(
                        Some(item.span()),
                        format!(
                            "`{}.{}` must be a string, not {}",
                            self.key_name(key),
                            k.get_ref(),
                            with_article(item.get_ref().type_str())
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// Marks `keys` as known without reading them (after a problem that makes them moot).
    pub fn skip(&mut self, keys: &[&'static str]) {
        self.known.extend_from_slice(keys);
    }

    /// A section that may be absent (`[refresh]`): absent reads as empty.
    pub fn section(&mut self, key: &'static str) -> Table<'t, 'i> {
        match self.table(key) {
            Some(t) => t,
            None => Table {
                cx: self.cx,
                name: self.key_name(key),
                table: None,
                span: self.span.clone(),
                known: Vec::new(),
            },
        }
    }

    /// An optional sub-table (`[name.key]`).
    pub fn table(&mut self, key: &'static str) -> Option<Table<'t, 'i>> {
        let v = self.get(key)?;
        match v.get_ref().as_table() {
            Some(t) => Some(self.child(key, t, v.span())),
            None => {
                self.wrong_type(key, v, "a table");
                None
            }
        }
    }

    /// An optional array of tables (`[[name.key]]`); empty when absent.
    pub fn tables(&mut self, key: &'static str) -> Vec<Table<'t, 'i>> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        let Some(items) = v.get_ref().as_array() else {
            self.wrong_type(
                key,
                v,
                &format!("an array of tables ([[{}]])", self.key_name(key)),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            match item.get_ref().as_table() {
                Some(t) => out.push(self.child(key, t, item.span())),
                None => self.wrong_type(key, item, "a table"),
            }
        }
        out
    }

    fn child(&self, key: &str, table: &'t DeTable<'i>, span: Range<usize>) -> Table<'t, 'i> {
        Table {
            cx: self.cx,
            name: self.key_name(key),
            table: Some(table),
            span,
            known: Vec::new(),
        }
    }

    /// Reports every key that no accessor asked for.
    pub fn finish(self) {
        let mut known = self.known.clone();
        known.sort_unstable();
        known.dedup();
        for (k, _) in self.entries() {
            let key = k.get_ref().as_ref();
            if !known.contains(&key) {
                let section = if self.name.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in [{}]", self.name)
                };
                self.cx.report_at(
                    Some(k.span()),
                    format!(
                        "unknown key `{}` {section}: the keys here are {}",
                        self.key_name(key),
                        known.join(", ")
                    ),
                );
            }
        }
    }
}

/// `an integer`, `a string`.
fn with_article(noun: &str) -> String {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {noun}")
    } else {
        format!("a {noun}")
    }
}
