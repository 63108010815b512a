//! Generic attribute syntax shared by op attributes (`{eps = 1e-5}`) and
//! patterns (`#sparsity(nm, n = 2, m = 4)`): positional words, then `key = value`.
//! Typed ops and patterns convert from and to it; this is only the spelling.

use std::fmt;

/// A literal attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Word(String),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Int(v) => write!(f, "{v}"),
            AttrValue::Float(v) => write!(f, "{}", fmt_float(*v as f32)),
            AttrValue::Bool(v) => write!(f, "{v}"),
            AttrValue::Str(s) => write!(f, "{}", quote(s)),
            AttrValue::Word(w) => f.write_str(w),
        }
    }
}

/// Prints an f32 so that parsing it gives the same bits, and always with a
/// `.` or exponent so it reads back as a float.
pub fn fmt_float(v: f32) -> String {
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E', 'N', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

/// Quotes a string with `\"` and `\\` escapes.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Arguments in the generic syntax.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttrArgs {
    pub positional: Vec<String>,
    pub keyed: Vec<(String, AttrValue)>,
}

impl AttrArgs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn word(mut self, w: &str) -> Self {
        self.positional.push(w.to_string());
        self
    }

    pub fn kv(mut self, k: &str, v: AttrValue) -> Self {
        self.keyed.push((k.to_string(), v));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.positional.is_empty() && self.keyed.is_empty()
    }

    /// Reads typed values out of the arguments, remembering which keys were used
    /// so that unknown keys can be reported.
    pub fn reader<'a>(&'a self, what: &'a str) -> ArgReader<'a> {
        ArgReader { args: self, what, used: vec![false; self.keyed.len()], next_pos: 0 }
    }
}

impl fmt::Display for AttrArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for p in &self.positional {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(p)?;
        }
        for (k, v) in &self.keyed {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{k} = {v}")?;
        }
        Ok(())
    }
}

/// Typed access to [`AttrArgs`]; every error is a sentence naming `what`.
pub struct ArgReader<'a> {
    args: &'a AttrArgs,
    what: &'a str,
    used: Vec<bool>,
    next_pos: usize,
}

impl<'a> ArgReader<'a> {
    /// The next positional word, if any.
    pub fn positional(&mut self) -> Option<&'a str> {
        let p = self.args.positional.get(self.next_pos)?;
        self.next_pos += 1;
        Some(p.as_str())
    }

    pub fn require_positional(&mut self, expected: &str) -> Result<&'a str, String> {
        self.positional().ok_or_else(|| format!("{}: expected a kind ({expected})", self.what))
    }

    fn take(&mut self, key: &str) -> Option<&'a AttrValue> {
        let i = self.args.keyed.iter().position(|(k, _)| k == key)?;
        self.used[i] = true;
        Some(&self.args.keyed[i].1)
    }

    pub fn opt_f32(&mut self, key: &str) -> Result<Option<f32>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(AttrValue::Float(v)) => Ok(Some(*v as f32)),
            Some(AttrValue::Int(v)) => Ok(Some(*v as f32)),
            Some(v) => Err(format!("{}: `{key}` must be a number, got `{v}`", self.what)),
        }
    }

    pub fn f32(&mut self, key: &str) -> Result<f32, String> {
        self.opt_f32(key)?.ok_or_else(|| format!("{}: missing `{key}`", self.what))
    }

    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(AttrValue::Int(v)) if u64::try_from(*v).is_ok() => Ok(Some(*v as u64)),
            Some(v) => Err(format!("{}: `{key}` must be a non-negative integer, got `{v}`", self.what)),
        }
    }

    pub fn u64(&mut self, key: &str) -> Result<u64, String> {
        self.opt_u64(key)?.ok_or_else(|| format!("{}: missing `{key}`", self.what))
    }

    pub fn u32(&mut self, key: &str) -> Result<u32, String> {
        let v = self.u64(key)?;
        u32::try_from(v).map_err(|_| format!("{}: `{key}` = {v} is too large", self.what))
    }

    pub fn opt_u32(&mut self, key: &str) -> Result<Option<u32>, String> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| format!("{}: `{key}` = {v} is too large", self.what)),
        }
    }

    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(AttrValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("{}: `{key}` must be true or false, got `{v}`", self.what)),
        }
    }

    pub fn opt_word(&mut self, key: &str) -> Result<Option<&'a str>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(AttrValue::Word(w)) => Ok(Some(w.as_str())),
            Some(v) => Err(format!("{}: `{key}` must be a word, got `{v}`", self.what)),
        }
    }

    pub fn opt_str(&mut self, key: &str) -> Result<Option<&'a str>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(AttrValue::Str(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!("{}: `{key}` must be a quoted string, got `{v}`", self.what)),
        }
    }

    /// Fails on positional words or keys that were not read.
    pub fn finish(self) -> Result<(), String> {
        if let Some(p) = self.args.positional.get(self.next_pos) {
            return Err(format!("{}: unexpected argument `{p}`", self.what));
        }
        if let Some(i) = self.used.iter().position(|u| !u) {
            return Err(format!("{}: unknown attribute `{}`", self.what, self.args.keyed[i].0));
        }
        Ok(())
    }
}
