//! The plan file (TOML, DESIGN.md's shape): rules that select tensors by layer
//! and role, or attention layers, and say which pattern each gets; presets name
//! seed plans. Parsing checks everything that needs no model (ranges, N ≤ M,
//! known keys); `apply-plan` checks the rest against the graph.

use serde::Deserialize;
use sparsec_ir::{Sparsity, Specialize, ValueCoding};

/// A parsed plan: its rules in order (later rules override earlier ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub rules: Vec<Rule>,
    /// The calibration text and token count of calibrated methods (`[calibration]`).
    pub calibration: Calibration,
}

/// How a sparsity pattern chooses what to prune.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PruneMethod {
    /// Smallest |w| (no calibration).
    #[default]
    Magnitude,
    /// |w|·‖x‖ per output row (Wanda), from calibration input norms.
    Wanda,
    /// Optimal-brain-surgeon updates with the calibration Hessian (SparseGPT).
    SparseGpt,
}

impl PruneMethod {
    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Wanda => "wanda",
            PruneMethod::SparseGpt => "sparsegpt",
        }
    }

    fn from_name(s: &str) -> Option<PruneMethod> {
        [PruneMethod::Magnitude, PruneMethod::Wanda, PruneMethod::SparseGpt].into_iter().find(|m| m.name() == s)
    }

    /// Whether the method needs calibration statistics.
    pub fn calibrated(self) -> bool {
        self != PruneMethod::Magnitude
    }
}

/// What calibrated methods run the model over: never the evaluation text.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Files concatenated (`text = "FILE"` or a list).
    pub texts: Vec<std::path::PathBuf>,
    /// Tokens taken from their start.
    pub tokens: usize,
}

/// The default calibration corpus: licence texts every Debian machine has, other
/// than GPL-3 (what sparsec evaluates on).
pub const DEFAULT_CALIBRATION_TEXTS: [&str; 3] =
    ["/usr/share/common-licenses/GPL-2", "/usr/share/common-licenses/LGPL-2.1", "/usr/share/common-licenses/Artistic"];

impl Default for Calibration {
    fn default() -> Self {
        Calibration { texts: DEFAULT_CALIBRATION_TEXTS.iter().map(Into::into).collect(), tokens: 8192 }
    }
}

/// Which layers a rule selects.
#[derive(Clone, Debug, PartialEq)]
pub enum Layers {
    All,
    /// Half-open `start..end`; `end` open-ended when `None`.
    Range {
        start: u64,
        end: Option<u64>,
    },
    List(Vec<u64>),
}

impl Layers {
    pub fn contains(&self, l: u64) -> bool {
        match self {
            Layers::All => true,
            Layers::Range { start, end } => l >= *start && end.is_none_or(|e| l < e),
            Layers::List(v) => v.contains(&l),
        }
    }

    /// The largest layer named explicitly (to check it exists).
    pub fn max_named(&self) -> Option<u64> {
        match self {
            Layers::All | Layers::Range { end: None, .. } => None,
            Layers::Range { start, end: Some(e) } => Some((*e).max(start + 1) - 1),
            Layers::List(v) => v.iter().copied().max(),
        }
    }
}

/// An attention window request.
#[derive(Clone, Debug, PartialEq)]
pub enum WindowPlan {
    Full,
    Fixed {
        size: u32,
        sinks: u32,
    },
    /// From `start` at the first selected layer to `end` at the last, geometrically.
    Progressive {
        start: u32,
        end: u32,
        sinks: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// 1-based, for messages.
    pub index: usize,
    pub layers: Layers,
    /// Role globs (`mlp.*`, `attn.q`, `lm_head`, `*`).
    pub targets: Vec<String>,
    pub sparsity: Option<Sparsity>,
    /// How `sparsity` chooses what to prune.
    pub method: PruneMethod,
    /// How `sparsity` stores the kept values (`values = "q4"`; f32 when not given).
    pub values: ValueCoding,
    pub specialize: Option<Specialize>,
    pub window: Option<WindowPlan>,
    /// `sparsity = { kind = "from-weights" }`: each selected weight keeps the
    /// zeros it has, as the pattern they form (`sparsity` is `None`);
    /// `resolve_from_weights` turns the rule into concrete ones, and
    /// `apply-plan` refuses it unresolved.
    pub from_weights: bool,
    /// Families the plan format names but this build cannot apply yet (`kv`, `share`, `nsa`).
    pub not_yet: Vec<&'static str>,
}

impl Rule {
    /// Whether the rule selects the weight of `role` in `layer` (`None`: a
    /// weight outside the layers, selected by `layers = "all"` only).
    pub fn selects(&self, layer: Option<u64>, role: &str) -> bool {
        let layer_ok = match layer {
            Some(l) => self.layers.contains(l),
            None => self.layers == Layers::All,
        };
        layer_ok && self.targets.iter().any(|t| glob(t, role))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("plan: {0}")]
    Toml(String),
    #[error("plan rule {rule}: {message}")]
    Rule { rule: usize, message: String },
    #[error("unknown preset `{0}` (known: {1})")]
    UnknownPreset(String, String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    rule: Vec<RuleFile>,
    calibration: Option<CalibrationFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrationFile {
    text: Option<TextFiles>,
    tokens: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextFiles {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    layers: Option<String>,
    target: Option<String>,
    sparsity: Option<SparsityFile>,
    specialize: Option<String>,
    attention: Option<AttentionFile>,
    kv: Option<toml::Value>,
    share: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum SparsityFile {
    Unstructured { ratio: f32, method: Option<String>, values: Option<String> },
    Nm { n: u32, m: u32, method: Option<String>, values: Option<String> },
    Block { ratio: f32, block: [u32; 2], method: Option<String>, values: Option<String> },
    // `from-weights`: keep the zeros the checkpoint already has; resolved per
    // weight against its data (`resolve_from_weights`) before the plan is applied.
    FromWeights {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttentionFile {
    window: Option<WindowFile>,
    nsa: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WindowFile {
    Size(u32),
    Word(String),
    Table { size: Option<u32>, sinks: Option<u32>, schedule: Option<String>, start: Option<u32>, end: Option<u32> },
}

fn parse_layers(s: &str) -> Result<Layers, String> {
    let s = s.trim();
    if s == "all" {
        return Ok(Layers::All);
    }
    let num = |t: &str| t.trim().parse::<u64>().map_err(|_| format!("layers = \"{s}\": `{t}` is not a layer number"));
    if let Some((a, b)) = s.split_once("..") {
        let start = if a.trim().is_empty() { 0 } else { num(a)? };
        let end = if b.trim().is_empty() { None } else { Some(num(b)?) };
        if end.is_some_and(|e| e <= start) {
            return Err(format!("layers = \"{s}\" is empty (ranges are half-open)"));
        }
        return Ok(Layers::Range { start, end });
    }
    Ok(Layers::List(s.split(',').map(num).collect::<Result<_, _>>()?))
}

fn ratio_in_range(r: f32) -> Result<f32, String> {
    if (0.0..1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("sparsity ratio {r} is outside [0, 1)"))
    }
}

impl Plan {
    /// Parses plan text; errors name the rule.
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let file: PlanFile = toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        for (i, r) in file.rule.into_iter().enumerate() {
            let index = i + 1;
            let err = |message: String| PlanError::Rule { rule: index, message };
            let layers = parse_layers(r.layers.as_deref().unwrap_or("all")).map_err(err)?;
            let targets: Vec<String> =
                r.target.as_deref().unwrap_or("*").split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            let method = match &r.sparsity {
                Some(SparsityFile::Unstructured { method, .. } | SparsityFile::Nm { method, .. } | SparsityFile::Block { method, .. }) => {
                    match method.as_deref() {
                        None => PruneMethod::Magnitude,
                        Some(m) => PruneMethod::from_name(m)
                            .ok_or_else(|| err(format!("method = \"{m}\" is not one of magnitude, wanda, sparsegpt")))?,
                    }
                }
                Some(SparsityFile::FromWeights {}) | None => PruneMethod::Magnitude,
            };
            let from_weights = matches!(r.sparsity, Some(SparsityFile::FromWeights {}));
            // `values = "f32" | "q8" | "q4"`: how the kept values are stored (`#values`).
            let values = match &r.sparsity {
                Some(SparsityFile::Unstructured { values, .. } | SparsityFile::Nm { values, .. } | SparsityFile::Block { values, .. }) => {
                    match values.as_deref() {
                        None => ValueCoding::F32,
                        Some(v) => ValueCoding::from_name(v).ok_or_else(|| err(format!("values = \"{v}\" is not one of f32, q8, q4")))?,
                    }
                }
                Some(SparsityFile::FromWeights {}) | None => ValueCoding::F32,
            };
            let sparsity = match r.sparsity {
                Some(SparsityFile::FromWeights {}) | None => None,
                Some(SparsityFile::Unstructured { ratio, .. }) => {
                    Some(Sparsity::Unstructured { ratio: ratio_in_range(ratio).map_err(err)? })
                }
                Some(SparsityFile::Nm { n, m, .. }) => {
                    if n == 0 || m == 0 || n > m || m > 255 {
                        return Err(err(format!("N:M sparsity needs 0 < n <= m <= 255, got {n}:{m}")));
                    }
                    Some(Sparsity::NM { n, m })
                }
                Some(SparsityFile::Block { ratio, block: [rows, cols], .. }) => {
                    if rows == 0 || cols == 0 {
                        return Err(err(format!("block shape [{rows}, {cols}] must be positive")));
                    }
                    Some(Sparsity::Block { ratio: ratio_in_range(ratio).map_err(err)?, rows, cols })
                }
            };
            let specialize = match r.specialize.as_deref() {
                None => None,
                Some(s) => Some(
                    Specialize::from_name(s)
                        .ok_or_else(|| err(format!("specialize = \"{s}\" is not one of dense, generic, indices, full, auto")))?,
                ),
            };
            let mut not_yet = Vec::new();
            let mut window = None;
            if let Some(a) = r.attention {
                if a.nsa.is_some() {
                    not_yet.push("attention.nsa");
                }
                window = match a.window {
                    None => None,
                    Some(WindowFile::Size(0)) => return Err(err("window size must be positive".into())),
                    Some(WindowFile::Size(size)) => Some(WindowPlan::Fixed { size, sinks: 0 }),
                    Some(WindowFile::Word(w)) if w == "full" => Some(WindowPlan::Full),
                    Some(WindowFile::Word(w)) => return Err(err(format!("window = \"{w}\" (expected a size, \"full\" or a table)"))),
                    Some(WindowFile::Table { size, sinks, schedule, start, end }) => {
                        let sinks = sinks.unwrap_or(0);
                        match (size, schedule.as_deref(), start, end) {
                            (Some(size), None, None, None) if size > 0 => Some(WindowPlan::Fixed { size, sinks }),
                            (None, Some("progressive"), Some(start), Some(end)) if start > 0 && end > 0 => {
                                Some(WindowPlan::Progressive { start, end, sinks })
                            }
                            _ => {
                                return Err(err(
                                    "window tables are { size = N, sinks = S } or { schedule = \"progressive\", start = A, end = B, sinks = S } with positive sizes".into(),
                                ))
                            }
                        }
                    }
                };
            }
            if r.kv.is_some() {
                not_yet.push("kv");
            }
            if r.share.is_some() {
                not_yet.push("share");
            }
            if sparsity.is_none() && !from_weights && specialize.is_none() && window.is_none() && not_yet.is_empty() {
                return Err(err("says nothing: give sparsity, specialize, attention, kv or share".into()));
            }
            rules.push(Rule { index, layers, targets, sparsity, method, values, specialize, window, from_weights, not_yet });
        }
        let mut calibration = Calibration::default();
        if let Some(c) = file.calibration {
            match c.text {
                Some(TextFiles::One(t)) => calibration.texts = vec![t.into()],
                Some(TextFiles::Many(v)) if !v.is_empty() => calibration.texts = v.into_iter().map(Into::into).collect(),
                Some(TextFiles::Many(_)) => return Err(PlanError::Toml("[calibration] text = [] names no file".into())),
                None => {}
            }
            match c.tokens {
                Some(0) => return Err(PlanError::Toml("[calibration] tokens must be positive".into())),
                Some(t) => calibration.tokens = t,
                None => {}
            }
        }
        Ok(Plan { rules, calibration })
    }

    /// The sparsity and method the plan gives the matmul weight of `role` in
    /// `layer` (`None`: not in a layer): the last rule that selects it and says
    /// a sparsity wins, as `apply-plan` applies them. `from-weights` rules
    /// count once resolved (`resolve_from_weights`), not before.
    pub fn sparsity_for(&self, layer: Option<u64>, role: &str) -> Option<(Sparsity, PruneMethod)> {
        self.rules.iter().rev().filter(|r| r.selects(layer, role)).find_map(|r| r.sparsity.clone().map(|s| (s, r.method)))
    }

    /// Whether any rule prunes with a calibrated method.
    pub fn needs_calibration(&self) -> bool {
        self.rules.iter().any(|r| r.sparsity.is_some() && r.method.calibrated())
    }

    /// The plan text of a named preset.
    pub fn preset(name: &str) -> Result<String, PlanError> {
        let text = match name {
            "half" => "[[rule]]\nlayers = \"all\"\nattention = { window = { schedule = \"progressive\", start = 1024, end = 512 } }\n",
            "quarter" => "[[rule]]\nlayers = \"all\"\nattention = { window = { schedule = \"progressive\", start = 1024, end = 256 } }\n",
            "aggressive" => "[[rule]]\nlayers = \"all\"\nattention = { window = { schedule = \"progressive\", start = 512, end = 16, sinks = 4 } }\n",
            "sparse-0.5" | "sparse-0.7" | "sparse-0.9" => {
                return Ok(format!(
                    "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = {{ kind = \"unstructured\", ratio = {} }}\nspecialize = \"auto\"\n",
                    &name["sparse-".len()..]
                ))
            }
            "2:4" => "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\nspecialize = \"generic\"\n",
            "block4x4-0.8" => {
                "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = { kind = \"block\", ratio = 0.8, block = [4, 4] }\nspecialize = \"generic\"\n"
            }
            other => return Err(PlanError::UnknownPreset(other.to_string(), PRESETS.join(", "))),
        };
        Ok(text.to_string())
    }
}

/// Every preset name.
pub const PRESETS: [&str; 8] = ["half", "quarter", "aggressive", "sparse-0.5", "sparse-0.7", "sparse-0.9", "2:4", "block4x4-0.8"];

/// `*` matches any run of characters.
pub fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else { return false };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_md_plan_parses() {
        let text = r#"
[[rule]]
layers = "all"
target = "mlp.*"
sparsity = { kind = "unstructured", ratio = 0.9 }
specialize = "auto"

[[rule]]
layers = "6.."
attention = { window = { schedule = "progressive", start = 512, end = 16 } }

[[rule]]
layers = "1,3,5"
target = "attn.q,attn.k"
sparsity = { kind = "block", ratio = 0.8, block = [4, 4] }
"#;
        let p = Plan::parse(text).unwrap();
        assert_eq!(p.rules.len(), 3);
        assert_eq!(p.rules[0].sparsity, Some(Sparsity::Unstructured { ratio: 0.9 }));
        assert_eq!(p.rules[1].layers, Layers::Range { start: 6, end: None });
        assert_eq!(p.rules[1].window, Some(WindowPlan::Progressive { start: 512, end: 16, sinks: 0 }));
        assert_eq!(p.rules[2].targets, vec!["attn.q", "attn.k"]);
        assert_eq!(p.rules[2].layers, Layers::List(vec![1, 3, 5]));
        for name in PRESETS {
            Plan::parse(&Plan::preset(name).unwrap()).unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    #[test]
    fn bad_plans_say_what_and_where() {
        let cases = [
            ("[[rule]]\nsparsity = { kind = \"unstructured\", ratio = 1.0 }", "rule 1: sparsity ratio 1 is outside [0, 1)"),
            ("[[rule]]\nsparsity = { kind = \"nm\", n = 4, m = 2 }", "rule 1: N:M sparsity needs 0 < n <= m"),
            ("[[rule]]\nlayers = \"6..2\"\nspecialize = \"dense\"", "is empty"),
            ("[[rule]]\nlayers = \"x\"\nspecialize = \"dense\"", "`x` is not a layer number"),
            ("[[rule]]\nspecialize = \"fast\"", "is not one of dense"),
            ("[[rule]]\ntarget = \"mlp.*\"", "says nothing"),
            ("[[rule]]\nsparsity = { kind = \"diagonal\" }", "plan:"),
            ("[[rule]]\nsparsty = { kind = \"nm\", n = 2, m = 4 }", "unknown field"),
            ("[[rule]]\nattention = { window = 0 }", "positive"),
        ];
        for (text, want) in cases {
            let e = Plan::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(Plan::preset("nope").unwrap_err().to_string().contains("known: half"));
    }

    #[test]
    fn from_weights_parses_without_a_model() {
        let p = Plan::parse("[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"from-weights\" }\nspecialize = \"generic\"").unwrap();
        let r = &p.rules[0];
        assert!(r.from_weights && r.sparsity.is_none() && r.method == PruneMethod::Magnitude);
        assert_eq!(r.specialize, Some(Specialize::Generic));
        assert_eq!(p.sparsity_for(Some(0), "mlp.up"), None);
        for (text, want) in [
            ("[[rule]]\nsparsity = { kind = \"from-weights\", ratio = 0.5 }", "unknown field `ratio`"),
            ("[[rule]]\nsparsity = { kind = \"from-weights\", method = \"wanda\" }", "unknown field `method`"),
            ("[[rule]]\nsparsity = { kind = \"from_weights\" }", "unknown variant `from_weights`"),
        ] {
            let e = Plan::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn globs_and_layers() {
        assert!(glob("mlp.*", "mlp.up") && glob("*", "lm_head") && glob("attn.q", "attn.q"));
        assert!(!glob("mlp.*", "attn.q") && !glob("attn.q", "attn.qq"));
        assert!(Layers::Range { start: 2, end: Some(4) }.contains(3) && !Layers::Range { start: 2, end: Some(4) }.contains(4));
    }
}
