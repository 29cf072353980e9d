# pg_generate_file(): Python's parallel_gen.jobs.run_file_job from R, on the real model.

file_prompts <- c("one, two, three", "The capital of France is", "red, green, blue", "Monday, Tuesday",
                  "The best way to learn is", "1 + 1 =")

write_input <- function(dir) write_id_csv(dir, "in.csv", "prompt", file_prompts, "doc")

test_that("pg_generate_file writes one row per input row, in order, fields carried, texts as pg_generate's", {
  m <- test_model()
  dir <- job_dir()
  input <- write_input(dir)
  output <- file.path(dir, "out.csv")
  s <- pg_generate_file(m, input, output, max_tokens = 6, temperature = 0, progress = FALSE)
  expect_s3_class(s, "data.frame")
  expect_identical(nrow(s), 1L)
  expect_identical(s$output, output)
  expect_identical(c(s$rows, s$written, s$skipped, s$failed), c(6L, 6L, 0L, 0L))
  expect_false(s$interrupted)
  expect_identical(s$n_ctx, m$n_ctx)  # a pg_model is used as it is
  out <- read.csv(output, stringsAsFactors = FALSE)
  expect_identical(names(out)[1:4], c("id", "prompt", "row", "text"))
  expect_true(all(c("finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error") %in% names(out)))
  expect_identical(out$id, sprintf("doc-%d", 1:6))
  expect_identical(out$row, 0:5)
  expect_identical(sum(out$completion_tokens), s$completion_tokens)
  direct <- pg_generate(m, file_prompts, max_tokens = 6, temperature = 0, progress = FALSE)
  expect_identical(out$text, direct$text)
  expect_identical(out$finish_reason, direct$finish_reason)
})

test_that("an existing output is protected; overwrite replaces it, resume finishes a cut job", {
  m <- test_model()
  dir <- job_dir()
  input <- write_input(dir)
  output <- file.path(dir, "out.jsonl")  # one line per row (a CSV field may hold newlines)
  pg_generate_file(m, input, output, max_tokens = 4, temperature = 0, progress = FALSE)
  full <- readLines(output)
  expect_length(full, 6L)

  e <- catch_error(pg_generate_file(m, input, output, max_tokens = 4, temperature = 0, progress = FALSE))
  expect_s3_class(e, c("pg_JobInputError", "pg_python_error"))
  expect_match(conditionMessage(e), "overwrite", fixed = TRUE)
  expect_match(conditionMessage(e), "resume", fixed = TRUE)
  expect_identical(readLines(output), full)  # untouched

  writeLines(full[1:2], output)  # two rows: a job stopped part way
  s <- pg_generate_file(m, input, output, max_tokens = 4, temperature = 0, resume = TRUE, progress = FALSE)
  expect_identical(c(s$rows, s$written, s$skipped), c(6L, 4L, 2L))
  expect_identical(readLines(output), full)  # the same as the uninterrupted run

  s <- pg_generate_file(m, input, output, max_tokens = 2, temperature = 0, overwrite = TRUE, progress = FALSE)
  expect_identical(s$written, 6L)
  expect_true(all(grepl("\"completion_tokens\": [12],", readLines(output))))
})

test_that("pg_generate_file: JSONL and text, a model path, per-row errors, argument errors", {
  m <- test_model()
  dir <- job_dir()
  text_in <- file.path(dir, "prompts.txt")
  writeLines(file_prompts[1:3], text_in)
  jsonl_out <- file.path(dir, "out.jsonl")
  s <- pg_generate_file(smollm2_path(), text_in, jsonl_out, max_tokens = 3, temperature = 0,
                        model_options = list(n_parallel = 2, n_threads = 1), progress = FALSE)
  expect_identical(s$rows, 3L)
  expect_true(s$n_ctx < 4096L)  # sized to the work when the job opens the model
  expect_length(readLines(jsonl_out), 3L)
  expect_match(readLines(jsonl_out)[1], "\"row\": 0", fixed = TRUE)

  bad_in <- file.path(dir, "bad.csv")
  write.csv(data.frame(id = 1:3, prompt = c("one, two", "", "red, green")), bad_in, row.names = FALSE)
  bad <- pg_generate_file(m, bad_in, file.path(dir, "bad-out.csv"), max_tokens = 2, progress = FALSE)
  expect_identical(c(bad$rows, bad$failed), c(3L, 1L))
  rows <- read.csv(file.path(dir, "bad-out.csv"), stringsAsFactors = FALSE)
  expect_identical(rows$finish_reason[2], "error")
  expect_true(nzchar(rows$error[2]))

  expect_error(pg_generate_file(m, NA_character_, "o.csv"), "`input` must be one non-empty string",
               class = "pg_argument_error")
  expect_error(pg_generate_file(m, text_in, c("a", "b")), "`output`", class = "pg_argument_error")
  expect_error(pg_generate_file(m, text_in, "o.csv", resume = NA), "`resume`", class = "pg_argument_error")
  expect_error(pg_generate_file(m, text_in, "o.csv", model_options = 1), "`model_options`",
               class = "pg_argument_error")
  expect_error(pg_generate_file(m, file.path(dir, "missing.csv"), file.path(dir, "o.csv"), progress = FALSE),
               "missing.csv", class = "pg_python_error")
  expect_error(pg_generate_file(m, text_in, file.path(dir, "o.csv"), input_format = "xml", progress = FALSE),
               "xml", class = "pg_python_error")
  expect_false(file.exists(file.path(dir, "o.csv")))
  expect_error(pg_generate_file(m, text_in, file.path(dir, "o2.csv"), max_tokens = 0, progress = FALSE),
               "max_tokens", class = "pg_ValueError")
})

test_that("pg_generate_file(cache =) answers a job run again from the result cache, without decoding", {
  # No KV reuse between rows: every row's prefill is whole, so every row is stored.
  m <- pg_model(smollm2_path(), n_parallel = 2, n_ctx = 256, n_threads = 1, prompt_cache = FALSE,
                share_prefix = FALSE)
  on.exit(pg_close(m))
  dir <- job_dir()
  input <- write_input(dir)
  cache <- file.path(dir, "cache")
  first <- pg_generate_file(m, input, file.path(dir, "one.csv"), max_tokens = 5, temperature = 0,
                            progress = FALSE, cache = cache)
  before <- .py_tokens_generated(m)
  second <- pg_generate_file(m, input, file.path(dir, "two.csv"), max_tokens = 5, temperature = 0,
                             progress = FALSE, cache = cache)
  expect_identical(c(first$written, second$written, second$failed), c(6L, 6L, 0L))
  expect_identical(.py_tokens_generated(m) - before, 0L)
  expect_identical(read.csv(file.path(dir, "two.csv"))$text, read.csv(file.path(dir, "one.csv"))$text)
  expect_error(pg_generate_file(m, input, file.path(dir, "x.csv"), cache = 1, progress = FALSE), "cache")
})
