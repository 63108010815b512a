//! `sparsec tradeoff`: the specialization dial as data. Compiles and
//! benchmarks a model or IR graph for every (pattern, sparsity, level) point,
//! appends each result to `results.jsonl` as it lands (a rerun resumes there),
//! and writes `tradeoff.csv`, `tradeoff.json` and `tradeoff.svg`: compile time
//! and code size against decode (and prefill) time, the Pareto front marked.

use crate::{do_compile, is_model, lm_verbs, CompileFlags};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use sparsec_ir::Specialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Compile seconds per baked stored value (`indices`/`full`): points estimated
/// above `--max-compile-s` are skipped.
const BAKE_SECONDS_PER_VALUE: f64 = sparsec_compiler::sparse_select::BAKE_MS_PER_VALUE / 1e3;

#[derive(Args)]
pub struct TradeoffArgs {
    /// Model (GGUF, HF directory, `smollm2`) or IR file.
    input: PathBuf,
    /// Unstructured and block sparsities to try (N:M patterns have their own).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9")]
    sparsity: Vec<f32>,
    /// Patterns: unstructured, N:M (`2:4`), block RxC (`block4x4`).
    #[arg(long, value_delimiter = ',', default_value = "unstructured,2:4,block4x4")]
    pattern: Vec<String>,
    /// Specialization levels: dense, generic, indices, full, auto.
    #[arg(long, value_delimiter = ',', default_value = "dense,generic,indices,full")]
    levels: Vec<String>,
    /// Layers the plan prunes (plan syntax).
    #[arg(long, default_value = "all")]
    layers: String,
    /// Roles the plan prunes (plan syntax).
    #[arg(long, default_value = "attn.*,mlp.*")]
    target: String,
    /// Models: prompt tokens for prefill; IR graphs: the prefill `seq`.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Models: decode steps timed.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// The text prompts are cut from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    text: PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Skip points whose estimated compile time exceeds this many seconds.
    #[arg(long, default_value_t = 300.0)]
    max_compile_s: f64,
    /// Results directory (resumed if it holds results.jsonl).
    #[arg(short, long, default_value = "tradeoff")]
    out: PathBuf,
    /// Ignore earlier results in --out.
    #[arg(long)]
    fresh: bool,
}

/// One measured (or skipped) point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub key: String,
    pub pattern: String,
    pub sparsity: f32,
    pub level: String,
    /// `ok`, or why there are no figures (`skipped: ...`, `failed: ...`).
    pub status: String,
    pub compile_s: f64,
    pub cpu_code_bytes: u64,
    pub llvm_ir_bytes: u64,
    pub weights_bytes: u64,
    /// Per decoded token (models) or per run at seq 1 (graphs).
    pub decode_ms: f64,
    /// Per prompt (models) or per run at seq = --prompt-len (graphs).
    pub prefill_ms: f64,
    #[serde(default)]
    pub pareto: bool,
    /// Models: each kernel's decode milliseconds per token (the run time the
    /// manifest cannot hold: artifacts are immutable).
    #[serde(default)]
    pub decode_kernel_ms: std::collections::BTreeMap<String, f64>,
}

/// The plan `sparsity = ...` value of a pattern name at a sparsity.
fn sparsity_toml(pattern: &str, ratio: f32) -> Result<(String, f32)> {
    if pattern == "unstructured" {
        return Ok((format!("{{ kind = \"unstructured\", ratio = {ratio} }}"), ratio));
    }
    if let Some((n, m)) = pattern.split_once(':') {
        let (n, m): (u32, u32) = (n.parse().context("N:M pattern")?, m.parse().context("N:M pattern")?);
        return Ok((format!("{{ kind = \"nm\", n = {n}, m = {m} }}"), 1.0 - n as f32 / m.max(1) as f32));
    }
    if let Some(shape) = pattern.strip_prefix("block") {
        let (r, c) = shape.split_once('x').context("block patterns are blockRxC, e.g. block4x4")?;
        let (r, c): (u32, u32) = (r.parse()?, c.parse()?);
        return Ok((format!("{{ kind = \"block\", ratio = {ratio}, block = [{r}, {c}] }}"), ratio));
    }
    bail!("unknown pattern `{pattern}` (unstructured, N:M like 2:4, blockRxC like block4x4)")
}

/// Stored values a planned graph bakes at a level (for the compile-time estimate).
fn planned_values(graph: &sparsec_ir::Graph, plan: &str) -> Result<u64> {
    let mut g = graph.clone();
    sparsec_passes::PassManager::with_plan(Some(sparsec_passes::Plan::parse(plan)?), Default::default()).run(&mut g)?;
    Ok(sparsec_ir::sparse::pruned_weights(&g).values().map(|pw| pw.format().stored_values()).sum())
}

/// Marks the points no other point beats in both compile time and decode time.
pub fn mark_pareto(points: &mut [Point]) {
    let ok: Vec<(f64, f64)> = points.iter().filter(|p| p.status == "ok").map(|p| (p.compile_s, p.decode_ms)).collect();
    for p in points.iter_mut() {
        p.pareto =
            p.status == "ok" && !ok.iter().any(|&(c, d)| c <= p.compile_s && d <= p.decode_ms && (c < p.compile_s || d < p.decode_ms));
    }
}

fn load_results(path: &Path) -> Vec<Point> {
    std::fs::read_to_string(path).map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()).unwrap_or_default()
}

/// Compiles one point (cold), times it, and removes the artifact.
fn measure(a: &TradeoffArgs, flags: &CompileFlags, dir: &Path, key: &str) -> Result<Point> {
    let out = dir.join(format!("{key}.sparsec"));
    let t = Instant::now();
    let compiled = do_compile(&a.input, Some(out.clone()), flags, None)?;
    let compile_s = t.elapsed().as_secs_f64();
    let m = &compiled.manifest;
    let code: usize = m.cpu_total(|s| s.code_bytes);
    let ir: usize = m.cpu_total(|s| s.llvm_ir_bytes);
    let weights = std::fs::metadata(out.join(sparsec_runtime::manifest::WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
    let mut decode_kernel_ms = std::collections::BTreeMap::new();
    let (decode_ms, prefill_ms) = if m.lm.is_some() {
        let src = lm_verbs::LmSource::artifact(&out, Some(a.threads), sparsec_runtime::execute::DeviceKind::Cpu)?;
        let r = lm_verbs::bench_lm(&src, &a.text, a.prompt_len, a.new_tokens, 1)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        if let Some(k) = r["decode_kernels"].as_object() {
            decode_kernel_ms = k.iter().map(|(name, v)| (name.clone(), v["ms_per_token"].as_f64().unwrap_or(0.0))).collect();
        }
        (f("decode_s") * 1e3 / a.new_tokens.max(1) as f64, f("prefill_s") * 1e3)
    } else {
        let art = sparsec_runtime::Artifact::open(&out)?;
        let exec = sparsec_runtime::execute::Executor::Cpu(sparsec_runtime::cpu::CpuExecutor::load(&art)?.with_threads(a.threads)?);
        // The least of three medians: this kind of VM has noisy neighbours.
        let best = |seq: u64, repeat: usize| -> Result<f64> {
            let x = art.random_inputs(seq, 0)?;
            let mut t = f64::MAX;
            for _ in 0..3 {
                t = t.min(exec.run_timed(&art, &x, repeat)?.1);
            }
            Ok(t)
        };
        (best(1, 200)?, best(a.prompt_len as u64, 20)?)
    };
    let _ = std::fs::remove_dir_all(&out);
    let p = Point {
        key: key.into(),
        pattern: String::new(),
        sparsity: 0.0,
        level: String::new(),
        status: "ok".into(),
        compile_s,
        cpu_code_bytes: code as u64,
        llvm_ir_bytes: ir as u64,
        weights_bytes: weights,
        decode_ms,
        prefill_ms,
        pareto: false,
        decode_kernel_ms,
    };
    Ok(p)
}

pub fn cmd_tradeoff(a: TradeoffArgs) -> Result<()> {
    std::fs::create_dir_all(a.out.join("plans")).with_context(|| format!("creating {}", a.out.display()))?;
    let results_path = a.out.join("results.jsonl");
    if a.fresh {
        let _ = std::fs::remove_file(&results_path);
    }
    let mut points = load_results(&results_path);
    let (graph, _) = crate::load_source(&a.input)?;
    // The points: a baseline without a plan, then pattern x sparsity x level.
    let mut todo: Vec<(String, String, f32, String, Option<String>)> = vec![("baseline".into(), "none".into(), 0.0, "none".into(), None)];
    for pattern in &a.pattern {
        let ratios: Vec<f32> = if pattern.contains(':') { vec![0.0] } else { a.sparsity.clone() };
        for r in ratios {
            let (sp, ratio) = sparsity_toml(pattern, r)?;
            for level in &a.levels {
                if Specialize::from_name(level).is_none() {
                    bail!("unknown level `{level}` (dense, generic, indices, full, auto)");
                }
                let key = format!("{}-{ratio:.2}-{level}", pattern.replace(':', "_"));
                let plan =
                    format!("[[rule]]\nlayers = \"{}\"\ntarget = \"{}\"\nsparsity = {sp}\nspecialize = \"{level}\"\n", a.layers, a.target);
                sparsec_passes::Plan::parse(&plan)?;
                todo.push((key, pattern.clone(), ratio, level.clone(), Some(plan)));
            }
        }
    }
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let lm = is_model(&a.input);
    for (key, pattern, ratio, level, plan) in todo {
        bar.set_message(key.clone());
        if points.iter().any(|p| p.key == key) {
            bar.inc(1);
            continue;
        }
        let mut flags = CompileFlags::for_tradeoff();
        let mut status = "ok".to_string();
        if let Some(plan) = &plan {
            let path = a.out.join("plans").join(format!("{key}.toml"));
            std::fs::write(&path, plan)?;
            flags.plan = Some(path);
            if matches!(level.as_str(), "indices" | "full") {
                let est = planned_values(&graph, plan)? as f64 * BAKE_SECONDS_PER_VALUE;
                if est > a.max_compile_s {
                    status = format!("skipped: estimated compile {est:.1} s > --max-compile-s {}", a.max_compile_s);
                }
            }
        }
        let mut p = if status == "ok" {
            match measure(&a, &flags, &a.out, &key) {
                Ok(p) => p,
                Err(e) => Point { status: format!("failed: {e:#}"), ..empty(&key) },
            }
        } else {
            Point { status, ..empty(&key) }
        };
        p.pattern = pattern;
        p.sparsity = ratio;
        p.level = level;
        eprintln!("{}", line(&p, lm));
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&results_path)?;
        writeln!(f, "{}", serde_json::to_string(&p)?)?;
        points.push(p);
        bar.inc(1);
    }
    bar.finish_and_clear();
    mark_pareto(&mut points);
    write_reports(&a.out, &points, lm)?;
    println!("{}", markdown(&points, lm));
    println!("wrote {}/tradeoff.{{csv,json,svg}}", a.out.display());
    Ok(())
}

fn empty(key: &str) -> Point {
    Point {
        key: key.into(),
        pattern: String::new(),
        sparsity: 0.0,
        level: String::new(),
        status: String::new(),
        compile_s: 0.0,
        cpu_code_bytes: 0,
        llvm_ir_bytes: 0,
        weights_bytes: 0,
        decode_ms: 0.0,
        prefill_ms: 0.0,
        pareto: false,
        decode_kernel_ms: Default::default(),
    }
}

fn line(p: &Point, lm: bool) -> String {
    if p.status != "ok" {
        return format!("{}: {}", p.key, p.status);
    }
    let unit = if lm { "ms/token" } else { "ms at seq 1" };
    format!(
        "{}: compile {:.2} s, code {:.1} KB, decode {:.3} {unit}, prefill {:.2} ms",
        p.key,
        p.compile_s,
        p.cpu_code_bytes as f64 / 1e3,
        p.decode_ms,
        p.prefill_ms
    )
}

fn markdown(points: &[Point], lm: bool) -> String {
    let d = if lm { "decode ms/token" } else { "run ms, seq 1" };
    let mut s = format!("| point | status | compile s | code KB | LLVM IR KB | weights MB | {d} | prefill ms | Pareto |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for p in points {
        if p.status != "ok" {
            s += &format!("| {} | {} | - | - | - | - | - | - | |\n", p.key, p.status);
            continue;
        }
        s += &format!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.3} | {:.2} | {} |\n",
            p.key,
            p.status,
            p.compile_s,
            p.cpu_code_bytes as f64 / 1e3,
            p.llvm_ir_bytes as f64 / 1e3,
            p.weights_bytes as f64 / 1e6,
            p.decode_ms,
            p.prefill_ms,
            if p.pareto { "yes" } else { "" }
        );
    }
    s
}

fn write_reports(dir: &Path, points: &[Point], lm: bool) -> Result<()> {
    let mut csv = String::from(
        "key,pattern,sparsity,level,status,compile_s,cpu_code_bytes,llvm_ir_bytes,weights_bytes,decode_ms,prefill_ms,pareto\n",
    );
    for p in points {
        csv += &format!(
            "{},{},{},{},\"{}\",{},{},{},{},{},{},{}\n",
            p.key,
            p.pattern,
            p.sparsity,
            p.level,
            p.status.replace('"', "'"),
            p.compile_s,
            p.cpu_code_bytes,
            p.llvm_ir_bytes,
            p.weights_bytes,
            p.decode_ms,
            p.prefill_ms,
            p.pareto
        );
    }
    std::fs::write(dir.join("tradeoff.csv"), csv)?;
    std::fs::write(dir.join("tradeoff.json"), serde_json::to_string_pretty(points)?)?;
    std::fs::write(dir.join("tradeoff.md"), markdown(points, lm))?;
    plot(&dir.join("tradeoff.svg"), points, lm)
}

/// Two panels: compile time and code size against decode time; Pareto points in red.
fn plot(path: &PathBuf, points: &[Point], lm: bool) -> Result<()> {
    use plotters::prelude::*;
    let ok: Vec<&Point> = points.iter().filter(|p| p.status == "ok" && p.decode_ms.is_finite()).collect();
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let ylabel = if lm { "decode ms / token" } else { "run ms (seq 1)" };
    let ymax = ok.iter().map(|p| p.decode_ms).fold(0.0, f64::max) * 1.1 + 1e-9;
    type Axis = (&'static str, Box<dyn Fn(&Point) -> f64>);
    let xs: [Axis; 2] =
        [("compile s", Box::new(|p: &Point| p.compile_s)), ("machine code KB", Box::new(|p: &Point| p.cpu_code_bytes as f64 / 1e3))];
    for (area, (xlabel, fx)) in panels.iter().zip(xs.iter()) {
        let xmax = ok.iter().map(|p| fx(p)).fold(0.0, f64::max) * 1.1 + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{ylabel} vs {xlabel}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.configure_mesh().x_desc(*xlabel).y_desc(ylabel).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(ok.iter().map(|p| {
                let c = if p.pareto { RED } else { BLUE };
                EmptyElement::at((fx(p), p.decode_ms))
                    + Circle::new((0, 0), 4, c.filled())
                    + Text::new(p.key.clone(), (6, -6), ("sans-serif", 10))
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut front: Vec<(f64, f64)> = ok.iter().filter(|p| p.pareto).map(|p| (fx(p), p.decode_ms)).collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.draw_series(LineSeries::new(front, RED.stroke_width(1))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(key: &str, c: f64, d: f64) -> Point {
        Point { status: "ok".into(), compile_s: c, decode_ms: d, ..empty(key) }
    }

    #[test]
    fn pareto_front_is_the_undominated_points() {
        let mut v = vec![
            pt("a", 1.0, 10.0),
            pt("b", 2.0, 5.0),
            pt("c", 3.0, 6.0),
            pt("d", 0.5, 20.0),
            Point { status: "skipped: x".into(), ..empty("e") },
        ];
        mark_pareto(&mut v);
        let front: Vec<&str> = v.iter().filter(|p| p.pareto).map(|p| p.key.as_str()).collect();
        assert_eq!(front, vec!["a", "b", "d"]);
    }

    #[test]
    fn pattern_names_become_plan_sparsity() {
        assert_eq!(sparsity_toml("2:4", 0.9).unwrap().1, 0.5);
        assert!(sparsity_toml("block4x4", 0.8).unwrap().0.contains("block = [4, 4]"));
        assert!(sparsity_toml("diagonal", 0.5).is_err());
    }
}
