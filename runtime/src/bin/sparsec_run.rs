//! `sparsec-run`: executes a compiled artifact on the CPU or an NVIDIA GPU,
//! optionally checking it against the reference interpreter and the CPU; for
//! a language model also KV-cached generation (`--prompt`), perplexity
//! (`--eval`) and prefill/decode speed (`--bench-decode`), with `--check` and
//! `--compare-cpu` comparing every prefill and decode step's logits.
//! Links no LLVM: this is what runs on the GPU machine.

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use ndarray::ArrayD;
use sparsec_runtime::compare::Tolerance;
use sparsec_runtime::cuda_session::SessionCapacity;
use sparsec_runtime::execute::{compare_all, reference_outputs, DeviceKind, Executor};
use sparsec_runtime::lm_session::{
    bench_decode, compare_steps, greedy, greedy_round, greedy_round_on_host, ids_input, logits, perplexity, Reference,
};
use sparsec_runtime::{Artifact, Trust};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

/// Run a sparsec artifact.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Artifact directory written by `sparsec compile`.
    artifact: PathBuf,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Sequence length bound to `seq` for random inputs.
    #[arg(long, default_value_t = 4)]
    seq: u64,
    /// Seed of the random (standard normal) inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the reference interpreter and compare (exit 1 on mismatch).
    #[arg(long)]
    check: bool,
    /// With --device cuda: also run on the CPU and compare.
    #[arg(long)]
    compare_cpu: bool,
    /// Absolute tolerance of comparisons.
    #[arg(long, default_value_t = 1e-4)]
    atol: f32,
    /// Relative tolerance of comparisons.
    #[arg(long, default_value_t = 1e-4)]
    rtol: f32,
    /// Timed runs after one warm-up (median reported).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Skip hashing the artifact's files at load (the structure is still
    /// validated): for an artifact this machine just built.
    #[arg(long)]
    trust: bool,
    /// Language models: generate greedily from this prompt (the artifact's tokenizer).
    #[arg(long)]
    prompt: Option<String>,
    /// New tokens after --prompt, and --bench-decode's decode steps.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Language models: perplexity of the first --max-tokens tokens of this text.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Tokens of the --eval window.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Language models: prefill --prompt-len random ids (--seed), then decode
    /// --max-new-tokens greedily through the KV caches; --repeat timed rounds.
    /// With --check / --compare-cpu, every call's logits are compared instead.
    #[arg(long)]
    bench_decode: bool,
    /// Prompt tokens of --bench-decode.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Rows per prefill call of the step comparison (the prompt in chunks).
    #[arg(long)]
    prefill_rows: Option<usize>,
    /// Positions the GPU session holds (default: the model's limit, at most 4096).
    #[arg(long, default_value_t = 4096)]
    positions: usize,
    /// Rows per GPU call (longer prefills run in chunks).
    #[arg(long, default_value_t = 512)]
    session_seq: usize,
    /// With --bench-decode: one more round after the timed ones with every
    /// kernel synchronized and timed; reports the prompt's milliseconds and
    /// milliseconds per decode token, by kernel.
    #[arg(long)]
    profile: bool,
    /// GPU: launch every kernel of a decode step instead of replaying the step
    /// captured once as a CUDA graph (the default).
    #[arg(long)]
    no_graphs: bool,
    /// GPU: launch each compiled kernel after the one before has completed,
    /// instead of as a programmatic dependent (sm_90+: its launch overlaps
    /// the kernel before, which it waits for before reading; the default).
    #[arg(long)]
    no_dependent_launch: bool,
    /// GPU: launch every kernel on the session's stream in turn, instead of
    /// consecutive kernels that touch disjoint memory (q, k and v
    /// projections) side by side on forked streams in calls of several rows
    /// (the default).
    #[arg(long)]
    no_side_by_side: bool,
    /// For an artifact compiled with `--strip-weights`: the checkpoint (GGUF
    /// file or HF directory) whose weights are packed at load, each to the
    /// type, sparse format and pattern it was compiled for.
    #[arg(long)]
    weights: Option<PathBuf>,
}

fn summary(a: &ArrayD<f32>) -> serde_json::Value {
    let head: Vec<f32> = a.iter().take(6).copied().collect();
    serde_json::json!({ "shape": a.shape(), "head": head, "sum": a.iter().map(|v| *v as f64).sum::<f64>() })
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away
    // (`| head`) instead of failing on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = real_main() {
        eprintln!("sparsec-run: error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let trust = if args.trust { Trust::SkipFileHashes } else { Trust::Verify };
    let art = Artifact::open_checkpoint(&args.artifact, trust, args.weights.as_deref())
        .with_context(|| format!("opening {}", args.artifact.display()))?;
    if args.prompt.is_some() || args.eval.is_some() || args.bench_decode {
        return model_verbs(&args, &art);
    }
    let inputs = art.random_inputs(args.seq, args.seed)?;
    let tol = Tolerance { atol: args.atol, rtol: args.rtol };
    let mut report = serde_json::json!({ "artifact": args.artifact, "graph": art.manifest.graph_name, "seq": args.seq });
    let device = device_kind(args.device);
    let exec = Executor::load(&art, device)?;
    let device_name = exec.device_name();
    let (outputs, run_ms) = exec.run_timed(&art, &inputs, args.repeat)?;
    report["device"] = device_name.clone().into();
    report["run_ms_median"] = run_ms.into();
    report["outputs"] = outputs.iter().map(summary).collect::<Vec<_>>().into();
    let mut ok = true;
    let mut check = |label: &str, want: &[ArrayD<f32>], report: &mut serde_json::Value| {
        let (passed, cmps) = compare_all(&outputs, want, tol);
        ok &= passed;
        report[label] = serde_json::json!({ "passed": passed, "tolerance": tol, "outputs": cmps });
    };
    if args.check {
        let reference = reference_outputs(&art, &inputs)?;
        check("check_reference", &reference, &mut report);
    }
    if args.compare_cpu && args.device == DeviceArg::Cuda {
        let cpu = Executor::load(&art, DeviceKind::Cpu)?.run(&art, &inputs)?;
        check("check_cpu", &cpu, &mut report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "graph {} on {device_name}, seq = {}: {:.3} ms (median of {})",
            art.manifest.graph_name,
            args.seq,
            run_ms,
            args.repeat.max(1)
        );
        for (i, o) in outputs.iter().enumerate() {
            let s = summary(o);
            println!("  output {i}: shape {} head {} sum {}", s["shape"], s["head"], s["sum"]);
        }
        for label in ["check_reference", "check_cpu"] {
            if let Some(c) = report.get(label) {
                let worst = c["outputs"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|o| o["max_abs_error"].as_f64()).fold(0.0, f64::max))
                    .unwrap_or(f64::NAN);
                println!(
                    "  {label}: {} (max abs error {worst:.3e}, atol {} rtol {})",
                    if c["passed"] == true { "PASS" } else { "FAIL" },
                    tol.atol,
                    tol.rtol
                );
            }
        }
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

fn device_kind(d: DeviceArg) -> DeviceKind {
    match d {
        DeviceArg::Cpu => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    }
}

fn tokenizer(art: &Artifact) -> Result<tokenizers::Tokenizer> {
    let lm = art.manifest.lm.as_ref().context("this artifact is not a language model (no tokenizer)")?;
    let path = art.dir.join(&lm.tokenizer);
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// `--prompt`, `--eval`, `--bench-decode`: KV-cached runs of a language model.
fn model_verbs(args: &Args, art: &Artifact) -> Result<()> {
    let mut exec = Executor::load(art, device_kind(args.device))?;
    let dependent_kernels = exec.set_dependent_launch(!args.no_dependent_launch);
    exec.set_side_by_side(!args.no_side_by_side);
    let device_name = exec.device_name();
    let cap = SessionCapacity { positions: args.positions, seq: args.session_seq };
    let mut session = exec.session(art, cap)?;
    session.set_graphs(!args.no_graphs);
    let (arena, side_runs) = match &session {
        sparsec_runtime::session::Session::Cuda(c) => (c.arena_bytes(), c.side_by_side_runs()),
        sparsec_runtime::session::Session::Cpu(_) => (0, 0),
    };
    let tol = Tolerance { atol: args.atol, rtol: args.rtol };
    let mut report = serde_json::json!({ "artifact": args.artifact, "graph": art.manifest.graph_name, "device": device_name });
    let mut ok = true;
    if let Some(prompt) = &args.prompt {
        let tok = tokenizer(art)?;
        let ids = tok.encode(prompt.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        if ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens");
        }
        let (mut new, t) = greedy_round(&mut session, &ids, args.max_new_tokens)?;
        if let Some(eos) = art.manifest.lm.as_ref().and_then(|l| l.eos) {
            if let Some(end) = new.iter().position(|i| *i == eos) {
                new.truncate(end);
            }
        }
        let text = tok.decode(&new, true).map_err(anyhow::Error::msg)?;
        report["generation"] = serde_json::json!({ "prompt": prompt, "ids": new, "text": text, "timing": t,
            "decode_tokens_per_s": t.decode_tokens_per_s() });
        if !args.json {
            println!("{prompt}{text}");
            eprintln!(
                "[{} prompt tokens in {:.3} s, {} new tokens in {:.3} s ({:.1} tok/s), {device_name}]",
                t.prompt_tokens,
                t.prefill_s,
                t.new_tokens,
                t.decode_s,
                t.decode_tokens_per_s()
            );
        }
    }
    if let Some(path) = &args.eval {
        let body = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let tok = tokenizer(art)?;
        let mut ids = tok.encode(body.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        ids.truncate(args.max_tokens);
        let t = std::time::Instant::now();
        let (ppl, n) = perplexity(&mut session, &ids)?;
        let secs = t.elapsed().as_secs_f64();
        report["eval"] = serde_json::json!({ "text": path, "perplexity": ppl, "predicted": n, "seconds": secs });
        if !args.json {
            println!("perplexity: {ppl:.4} ({n} predicted tokens, {secs:.2} s, {device_name})");
        }
    }
    if args.bench_decode {
        let prompt: Vec<u32> = art
            .random_inputs(args.prompt_len as u64, args.seed)?
            .first()
            .map(|a| a.iter().map(|v| *v as u32).collect())
            .unwrap_or_default();
        let checks = args.check || args.compare_cpu;
        if checks {
            let rows = args.prefill_rows.unwrap_or(prompt.len());
            let mut run_check = |label: &str, reference: &mut Reference<'_>, report: &mut serde_json::Value| -> Result<()> {
                let steps = compare_steps(&mut session, reference, &prompt, rows, args.max_new_tokens, tol)?;
                let passed = steps.iter().all(|s| s.cmp.passed);
                let worst = steps.iter().map(|s| s.cmp.max_abs_error).fold(0f32, f32::max);
                ok &= passed;
                if !args.json {
                    println!(
                        "{label}: {} over {} calls (prefill {} rows a call, then {} decode steps; max abs error {worst:.3e}, atol {} rtol {})",
                        if passed { "PASS" } else { "FAIL" },
                        steps.len(),
                        rows,
                        args.max_new_tokens,
                        tol.atol,
                        tol.rtol
                    );
                }
                report[label] = serde_json::json!({ "passed": passed, "max_abs_error": worst, "tolerance": tol, "steps": steps });
                Ok(())
            };
            if args.check {
                run_check("check_reference", &mut Reference::Interpreter(art), &mut report)?;
            }
            if args.compare_cpu {
                let cpu = Executor::load(art, DeviceKind::Cpu)?;
                let mut r = Reference::Session(cpu.session(art, cap)?);
                run_check("check_cpu", &mut r, &mut report)?;
            }
        } else {
            let (ids, t) = bench_decode(&mut session, &prompt, args.max_new_tokens, args.repeat)?;
            report["bench"] = serde_json::json!({ "timing": t, "graphs": !args.no_graphs, "dependent_kernels": dependent_kernels, "side_by_side_runs": side_runs, "prompt_ids": prompt, "ids": ids, "arena_bytes": arena, "prefill_tokens_per_s": t.prompt_tokens as f64 / t.prefill_s.max(1e-12),
                "decode_tokens_per_s": t.decode_tokens_per_s(), "decode_ms_per_token": 1e3 * t.decode_s / t.new_tokens.max(1) as f64 });
            // The timed rounds chose ids on the device (GPU); the host's argmax
            // of every step's logits must choose the same.
            let host_equal = greedy_round_on_host(&mut session, &prompt, args.max_new_tokens)? == ids;
            report["bench"]["host_argmax_ids_equal"] = host_equal.into();
            // The prompt's last row as generation computes it (the row-local
            // tail on that row alone) against the same row of a full call.
            session.reset();
            let full = logits(session.run(&[ids_input(&prompt)])?, prompt.len())?;
            session.reset();
            let last = logits(session.run_last(&[ids_input(&prompt)])?, 1)?;
            let full_last = full.index_axis(ndarray::Axis(0), prompt.len().saturating_sub(1));
            let diff = full_last.iter().zip(last.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            report["bench"]["last_row_max_abs_diff"] = diff.into();
            if !host_equal {
                eprintln!("warning: the greedy ids differ from the host's argmax of the same steps' logits");
            }
            if args.profile {
                // The prompt, then the decode steps, each profiled on its own.
                session.reset();
                session.profile_kernels();
                let l = logits(session.run_last(&[ids_input(&prompt)])?, 1)?;
                let times = session.kernel_times();
                if !args.json {
                    println!("prefill of {} tokens by kernel (each launch synchronized):", prompt.len());
                    for (k, ms, n) in &times {
                        println!("  {k:<28} {ms:>9.4} ms {n:>6} launches");
                    }
                }
                report["profile_prefill_ms"] = times
                    .iter()
                    .map(|(k, ms, n)| (k.clone(), serde_json::json!({ "ms": ms, "launches": n })))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                let mut next = greedy(&l);
                session.profile_kernels();
                for _ in 0..args.max_new_tokens {
                    let l = logits(session.run_last(&[ids_input(&[next])])?, 1)?;
                    next = greedy(&l);
                }
                let per = args.max_new_tokens.max(1) as f64;
                let times = session.kernel_times();
                if !args.json {
                    println!("decode, per token by kernel (each launch synchronized):");
                    for (k, ms, n) in &times {
                        println!("  {k:<28} {:>9.4} ms {:>6.1} launches", ms / per, *n as f64 / per);
                    }
                }
                report["profile_ms_per_token"] = times
                    .iter()
                    .map(|(k, ms, n)| (k.clone(), serde_json::json!({ "ms": ms / per, "launches": *n as f64 / per })))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            if !args.json {
                println!(
                    "{} on {device_name}: prefill {} tokens in {:.2} ms ({:.0} tok/s); decode {} tokens at {:.1} tok/s ({:.3} ms/token; median of {})",
                    art.manifest.graph_name,
                    t.prompt_tokens,
                    1e3 * t.prefill_s,
                    t.prompt_tokens as f64 / t.prefill_s.max(1e-12),
                    t.new_tokens,
                    t.decode_tokens_per_s(),
                    1e3 * t.decode_s / t.new_tokens.max(1) as f64,
                    args.repeat.max(1)
                );
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
