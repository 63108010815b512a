//! The `sparsec` command line's definitions (clap): the verbs, their
//! arguments and the compile flags they share. What the verbs do is in main.rs.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sparsec", version, about = "Ahead-of-time compiler for transformer LMs with fixed sparsity/compression patterns")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Skip hashing an artifact's files when loading it (its structure is
    /// still validated): for artifacts this machine just built. See README.
    #[arg(long, global = true)]
    pub trust: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Compile an IR file (or, later, a model) into an artifact.
    Compile(CompileArgs),
    /// Run an artifact (or compile-and-run an IR file) on random inputs.
    Run(RunArgs),
    /// Perplexity of a model (GGUF, HF directory, or `smollm2`) on a text file.
    Eval(EvalArgs),
    /// Compile-time and run-time figures of an artifact or IR file.
    Bench(BenchArgs),
    /// Show what an artifact or IR file contains.
    Inspect(InspectArgs),
    /// Compile and benchmark every (pattern, sparsity, specialization level)
    /// point: compile time and code size against decode and prefill time.
    Tradeoff(crate::tradeoff::TradeoffArgs),
    /// Write a model with a plan's pruning applied, or an artifact's weights,
    /// as a Hugging Face safetensors directory (dense f32, zeros in place).
    Export(ExportArgs),
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum TargetArg {
    Cpu,
    Cuda,
    All,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Args, Clone)]
pub struct CompileFlags {
    /// Which code to generate.
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: TargetArg,
    /// Weights (safetensors, F32) for the graph's `weight` ops; weights with an `init` may be left out.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Plan file (TOML): which layers and tensors get which pattern (DESIGN.md).
    #[arg(long, conflicts_with = "preset")]
    pub plan: Option<PathBuf>,
    /// Named plan: half, quarter, aggressive, sparse-0.5, sparse-0.7, sparse-0.9, 2:4, block4x4-0.8.
    #[arg(long)]
    pub preset: Option<String>,
    /// Also write these into the artifact's emit/ folder: ir,mlir,llvm,ptx,asm.
    #[arg(long, value_delimiter = ',')]
    pub emit: Vec<String>,
    /// Print the IR after every pass (to stderr).
    #[arg(long)]
    pub print_after_all: bool,
    /// Print the IR after the named pass (repeatable).
    #[arg(long)]
    pub print_after: Vec<String>,
    /// Print the IR before the named pass (repeatable).
    #[arg(long)]
    pub print_before: Vec<String>,
    /// LLVM CPU to generate for (`host`, `x86-64-v3`, `znver3`, ...).
    #[arg(long, default_value = "host")]
    pub cpu: String,
    /// LLVM features appended to `--cpu`'s, each `+name` or `-name` (the last
    /// one written wins): `-amx-bf16` compiles without AMX tiles on an AMX host.
    #[arg(long, default_value = "")]
    pub cpu_features: String,
    /// PTX target architecture.
    #[arg(long, default_value = "sm_90")]
    pub sm: String,
    /// LLVM optimization level.
    #[arg(long, default_value_t = 3)]
    pub opt_level: u8,
    /// Do not use the artifact cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Cache directory (default: $SPARSEC_CACHE_DIR, $XDG_CACHE_HOME/sparsec or ~/.cache/sparsec).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Check every PTX file with ptxas.
    #[arg(long)]
    pub ptxas: bool,
    /// What `specialize = "auto"` may spend on kernels with baked nonzero
    /// structure, over the whole model: estimated compile milliseconds.
    #[arg(long, default_value_t = sparsec_compiler::BakeBudget::default().compile_ms)]
    pub bake_budget_ms: u64,
    /// ... and estimated machine-code kilobytes.
    #[arg(long, default_value_t = sparsec_compiler::BakeBudget::default().code_bytes >> 10)]
    pub bake_budget_kb: u64,
    /// How CPU matmuls over Q8_0/Q4_0/Q4_1 weights take their activations:
    /// `int8` (quantized per block of 32, integer dot products, like llama.cpp;
    /// needs AVX2) or `f32` (equals the reference to f32 rounding).
    #[arg(long, value_enum, default_value_t = QuantActivationsArg::Int8)]
    pub quant_activations: QuantActivationsArg,
    /// The KV caches' element type: `f16` (like llama.cpp; half the memory
    /// and attention reads), `f32` (equals the reference to f32 rounding), or
    /// (CPU only) blocks of 32 along each key and value row quantized as Q8_0
    /// (8-bit, 53% of f16), Q4_0 or Q4_1 (4-bit).
    /// Default: f16 for `--target cpu`, f32 for targets that include CUDA.
    #[arg(long, value_enum)]
    pub kv_cache: Option<KvCacheArg>,
    /// Rotate each head's keys and values by the normalized Hadamard matrix
    /// before a block-quantized cache stores them (QuaRot): outlier channels
    /// spread over the block, so 4-bit caches lose less. Attention rotates
    /// the query the same way and the result back; power-of-two head widths.
    #[arg(long)]
    pub kv_hadamard: bool,
    /// With `--kv-cache q4_1`: quantize the keys per channel, as KIVI does
    /// (each channel of every complete group of 32 positions gets its own
    /// scale and minimum; the newest group stays exact), the values per token.
    /// An outlier channel of K then costs only itself. CPU caches.
    #[arg(long)]
    pub kv_kivi: bool,
    /// What the CUDA prefill's tensor-core matmuls over f16/bf16 weights do
    /// with the f32 activations: `split` (a hi and a lo part of the weights'
    /// type, two MMAs; products near f32 rounding) or `half` (rounded to the
    /// weights' type, one MMA, as an f16/bf16 GEMM in PyTorch: up to 2^-11
    /// (f16) or 2^-8 (bf16) relative error per activation).
    #[arg(long, value_enum, default_value_t = GpuMmaActivationsArg::Split)]
    pub gpu_mma_activations: GpuMmaActivationsArg,
    /// The element type of dense matmul weights and embedding tables: `auto`
    /// (the checkpoint's: f16 or bf16 when all its matrices are stored so,
    /// kept as they are; else f32; `--dequantize` makes it f32), `f32`
    /// (exact), `f16` or `bf16` (half the bytes; kernels widen them and
    /// accumulate in f32), `q8_0` or `q4_1` (blocks of 32 quantized as the
    /// weights are packed, llama.cpp's formats; matrices whose rows are not
    /// whole blocks stay f32). Quantized checkpoint tensors and pruned weights keep
    /// their types; a bf16 (f16) checkpoint compiled with bf16 (f16) keeps its values.
    #[arg(long, value_enum, default_value_t = WeightsDTypeArg::Auto)]
    pub weights_dtype: WeightsDTypeArg,
    /// Type every weight f32: quantized checkpoint tensors are dequantized at
    /// compile time (by default Q8_0/Q4_0/Q4_1 matrices stay quantized).
    #[arg(long)]
    pub dequantize: bool,
    /// Leave the checkpoint's tensors out of the artifact (MODEL only): the
    /// manifest lists them, and `sparsec-run ARTIFACT --weights CHECKPOINT`
    /// packs them at load (types, sparse formats and `#sparsity` as compiled),
    /// so a small artifact runs on a machine that holds the checkpoint.
    /// Refused for weights derived at compile time (calibrated pruning, low
    /// rank, fitted bases) and for kernels that bake a weight into code.
    #[arg(long)]
    pub strip_weights: bool,
}

/// Compile flags alone, for verbs that compile on the user's behalf.
#[derive(Parser)]
struct FlagsOnly {
    #[command(flatten)]
    flags: CompileFlags,
}

impl CompileFlags {
    /// The defaults without the cache (cold compiles are what `tradeoff` measures).
    pub fn for_tradeoff() -> CompileFlags {
        FlagsOnly::parse_from(["sparsec", "--no-cache"]).flags
    }
}

#[derive(Args)]
pub struct CompileArgs {
    /// IR file (`.sir`), or a model: GGUF file, Hugging Face directory, or `smollm2`.
    pub input: PathBuf,
    /// Artifact directory (default: `<graph name>.sparsec` in the current directory).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub flags: CompileFlags,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// Artifact directory, IR file (compiled first, through the cache), or with
    /// --prompt a model: GGUF file, Hugging Face directory, or `smollm2`.
    pub input: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// New tokens to generate after --prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sequence length of the random inputs.
    #[arg(long, default_value_t = 4)]
    pub seq: u64,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compare with the reference interpreter (exit 1 on mismatch; atol = rtol = 1e-4).
    #[arg(long)]
    pub check: bool,
    /// Generate from this prompt (streams text): with an artifact of a model, on
    /// the compiled model; with a model, on the reference interpreter (or
    /// compiled through the cache with --compiled). Both use a KV cache.
    #[arg(long)]
    pub prompt: Option<String>,
    /// With a model: compile it (through the cache) and run the compiled model.
    #[arg(long)]
    pub compiled: bool,
    /// CPU threads of the compiled model (default: $SPARSEC_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub flags: CompileFlags,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A model (GGUF file, Hugging Face directory, `smollm2`) with --plan or
    /// --preset, or the artifact of a compiled model.
    pub input: PathBuf,
    /// The directory to write (must not exist): config.json, model.safetensors, tokenizer.json.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Plan file (TOML) whose pruning is applied to the model's weights, as compile does.
    #[arg(long, conflicts_with = "preset")]
    pub plan: Option<PathBuf>,
    /// Named plan (see compile --preset).
    #[arg(long)]
    pub preset: Option<String>,
    /// Where calibrated methods keep their statistics (default: the compile cache's place).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not cache calibration statistics.
    #[arg(long)]
    pub no_cache: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// GGUF file, Hugging Face directory, `smollm2` (the installed default), or
    /// the artifact of a compiled model.
    pub model: String,
    /// The text to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window: the first N tokens of the text, as one sequence (no BOS added).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Slide windows of --max-tokens by this many tokens over the whole text.
    #[arg(long)]
    pub stride: Option<usize>,
    /// Run the compiled model (compiled through the cache) instead of the reference interpreter.
    #[arg(long)]
    pub compiled: bool,
    /// Where the compiled model runs (cuda: a model is compiled for the GPU through the cache).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// CPU threads of the compiled model (default: $SPARSEC_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub flags: CompileFlags,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// IR file or model (compiled cold into a fresh cache, then again as a cache
    /// hit) or artifact. Models and their artifacts are benchmarked as language
    /// models: prefill and decode tokens/s.
    pub input: PathBuf,
    /// Language models: prompt tokens (the start of --text) for prefill.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Language models: greedy decode steps after the prompt.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Language models: the text the prompt is cut from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    pub text: PathBuf,
    /// CPU threads (default: $SPARSEC_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where language models run (cuda: compiled with PTX, KV caches on the GPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Sequence length.
    #[arg(long, default_value_t = 64)]
    pub seq: u64,
    /// Timed runs (median reported); language models: prefill+decode rounds (default 1).
    #[arg(long)]
    pub repeat: Option<usize>,
    #[command(flatten)]
    pub flags: CompileFlags,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Artifact directory, IR file, or model (GGUF, HF directory, `smollm2`).
    pub input: PathBuf,
    #[arg(long)]
    pub json: bool,
    /// For a model or IR file: apply this plan and print what every matmul and attention layer gets.
    #[arg(long, conflicts_with = "preset")]
    pub plan: Option<PathBuf>,
    /// As --plan, with a named preset.
    #[arg(long)]
    pub preset: Option<String>,
}

/// `--gpu-mma-activations` (sparsec_compiler::GpuMmaActivations).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GpuMmaActivationsArg {
    Split,
    Half,
}

/// `--quant-activations` (sparsec_compiler::QuantActivations).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QuantActivationsArg {
    Int8,
    F32,
}

/// `--weights-dtype` (sparsec_compiler::WeightsDType).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightsDTypeArg {
    /// The checkpoint's: f16 or bf16 where all its matrices are stored so
    /// (kept as they are), else f32.
    Auto,
    F32,
    F16,
    Bf16,
    /// Blocks of 32 int8 values and an f16 scale (llama.cpp's Q8_0).
    #[value(name = "q8_0")]
    Q8_0,
    /// Blocks of 32 4-bit values, an f16 scale and offset (llama.cpp's Q4_1).
    #[value(name = "q4_1")]
    Q4_1,
}

/// `--kv-cache` (sparsec_compiler::KvCacheType).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvCacheArg {
    F16,
    F32,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}
