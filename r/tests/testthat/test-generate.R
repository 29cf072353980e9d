questions <- c("What is the capital of France?", "Count from one to five.",
               "Name a fruit that is yellow.", "Say hello in Spanish.")
prompts <- chat_prompt(questions)
columns <- c("prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error")

test_that("one row per prompt, in prompt order, with the documented columns", {
  m <- test_model()
  out <- pg_generate(m, prompts, max_tokens = 8, temperature = 0, progress = FALSE)
  expect_s3_class(out, "data.frame")
  expect_named(out, columns)
  expect_identical(nrow(out), length(prompts))
  expect_identical(out$prompt, prompts)
  expect_type(out$text, "character")
  expect_type(out$prompt_tokens, "integer")
  expect_type(out$completion_tokens, "integer")
  expect_true(all(out$finish_reason %in% c("stop", "length")))
  expect_true(all(is.na(out$error)))
  expect_true(all(out$completion_tokens >= 1L & out$completion_tokens <= 8L))
  expect_true(all(out$prompt_tokens > 5L))
  expect_identical(length(unique(out$text)), length(prompts))  # so that order is visible

  # Each row answers its own prompt: greedy output alone equals output in the batch
  # (SmolLM2 is batch invariant), and reversing the prompts reverses the rows.
  alone <- vapply(prompts, function(p) {
    pg_generate(m, p, max_tokens = 8, temperature = 0, progress = FALSE)$text
  }, character(1), USE.NAMES = FALSE)
  expect_identical(out$text, alone)
  backwards <- pg_generate(m, rev(prompts), max_tokens = 8, temperature = 0, progress = FALSE)
  expect_identical(backwards$text, rev(out$text))
  expect_identical(backwards$prompt, rev(prompts))
})

test_that("character vectors of any length: one string, named, factor, none", {
  m <- test_model()
  one <- pg_generate(m, prompts[1], max_tokens = 3, temperature = 0, progress = FALSE)
  expect_identical(nrow(one), 1L)
  expect_identical(one$prompt, prompts[1])
  named <- pg_generate(m, c(a = prompts[1], b = prompts[2]), max_tokens = 3, temperature = 0,
                       progress = FALSE)
  expect_identical(nrow(named), 2L)
  expect_identical(named$prompt, prompts[1:2])
  fac <- pg_generate(m, factor(prompts[2:1]), max_tokens = 3, temperature = 0, progress = FALSE)
  expect_identical(fac$prompt, prompts[2:1])
  utf8 <- chat_prompt("Traduis : caf\u00e9 cr\u00e8me \u2615")
  latin1 <- iconv(chat_prompt("Traduis : caf\u00e9 cr\u00e8me"), "UTF-8", "latin1")
  expect_identical(Encoding(latin1), "latin1")
  enc <- pg_generate(m, c(utf8, latin1), max_tokens = 3, temperature = 0, progress = FALSE)
  expect_identical(enc$prompt, c(utf8, latin1))
  expect_true(all(enc$finish_reason %in% c("stop", "length")))
  non_ascii <- enc$text[grepl("[^ -~]", enc$text)]
  expect_true(all(Encoding(non_ascii) == "UTF-8"))
  expect_identical(enc$prompt_tokens[2],
                   pg_generate(m, enc2utf8(latin1), max_tokens = 1, progress = FALSE)$prompt_tokens)
  none <- pg_generate(m, character(0), max_tokens = 3, progress = FALSE)
  expect_identical(nrow(none), 0L)
  expect_named(none, columns)
})

test_that("doubles are coerced to integers where Python needs an int", {
  m <- test_model()  # opened with n_parallel = 4, n_ctx = 256, n_threads = 1 (doubles)
  expect_identical(m$n_parallel, 4L)
  expect_identical(m$n_ctx, 256L)
  out <- pg_generate(m, prompts[1:2], max_tokens = 5, temperature = 0.7, top_k = 20,
                     repeat_last_n = 32, seed = 3e9, stop_token_ids = c(49000, 49001),
                     ignore_eos = TRUE, progress = FALSE)
  expect_identical(out$completion_tokens, c(5L, 5L))
  expect_error(pg_generate(m, "a", max_tokens = 2.5), "`max_tokens` must be a single whole number",
               class = "pg_argument_error")
  expect_error(pg_generate(m, "a", seed = NA), "`seed`", class = "pg_argument_error")
  expect_error(pg_generate(m, "a", top_k = c(1, 2)), "`top_k`", class = "pg_argument_error")
  expect_error(pg_generate(m, "a", stop_token_ids = c(1, NA)), "stop_token_ids", class = "pg_argument_error")
  expect_error(pg_model(smollm2_path(), n_parallel = "4"), "`n_parallel`", class = "pg_argument_error")
  expect_error(pg_generate(m, "a", 1, 0, 7), "must be named", class = "pg_argument_error")
})

test_that("NA prompts are an R error naming the index", {
  m <- test_model()
  expect_error(pg_generate(m, c("a", NA, "b")), "prompts[2] is NA", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_generate(m, c(NA, "a", NA)), "prompts[1], prompts[3] are NA", fixed = TRUE)
  expect_error(pg_generate(m, NA_character_), "prompts[1] is NA", fixed = TRUE)
  expect_error(pg_generate(m, NA), "must be a character vector", class = "pg_argument_error")
  expect_error(pg_generate(m, 1:3), "must be a character vector", class = "pg_argument_error")
  expect_error(pg_generate(m, "a", stop = c(".", NA)), "stop[2]", fixed = TRUE, class = "pg_argument_error")
  e <- catch_error(pg_generate(m, c("a", NA)))
  expect_identical(deparse(conditionCall(e)[[1]]), "pg_generate")  # the user's call, not a helper
})

test_that("a prompt that cannot run is an error row; the others complete", {
  m <- test_model()
  out <- pg_generate(m, c(prompts[1], "", prompts[2]), max_tokens = 3, temperature = 0, progress = FALSE)
  expect_identical(out$finish_reason[2], "error")
  expect_false(is.na(out$error[2]))
  expect_identical(out$completion_tokens[2], 0L)
  expect_true(all(out$finish_reason[-2] %in% c("stop", "length")))
  expect_true(all(is.na(out$error[-2])))
  expect_identical(pg_stats()$failed, 1L)
})

test_that("Python exceptions become R conditions with the original message", {
  m <- test_model()
  e <- catch_error(pg_generate(m, "a", max_tokens = 0))
  # ParamError, a ValueError naming the field: caught as either
  expect_s3_class(e, c("pg_ParamError", "pg_ValueError", "pg_Exception", "pg_python_error", "pg_error", "error"))
  expect_identical(conditionMessage(e), "SamplingParams.max_tokens=0: must be >= 1")
  expect_identical(e$python_class, "ParamError")
  expect_identical(reticulate::py_to_r(reticulate::py_get_attr(e$python_exception, "field")), "max_tokens")
  expect_match(e$python_traceback, "ParamError", fixed = TRUE)
  expect_identical(deparse(conditionCall(e)[[1]]), "pg_generate")

  expect_error(pg_generate(m, "a", foo = 1), "unknown sampling option(s): foo", fixed = TRUE,
               class = "pg_TypeError")
  expect_error(pg_generate(m, "a", temperature = -1), "temperature=-1", fixed = TRUE, class = "pg_ValueError")
  caught <- tryCatch(pg_generate(m, "a", top_p = 2), pg_ValueError = function(e) "caught")
  expect_identical(caught, "caught")

  expect_error(pg_model(tempfile(fileext = ".gguf")), "model file not found", class = "pg_FileNotFoundError")
  not_gguf <- tempfile(fileext = ".gguf")
  writeLines("not a model", not_gguf)
  expect_error(pg_model(not_gguf), "not a GGUF model file", class = "pg_ModelLoadError")
  expect_error(pg_model(smollm2_path(), n_parallel = 0), "n_parallel", class = "pg_ValueError")

  closed <- pg_model(smollm2_path(), n_parallel = 1, n_ctx = 64)
  pg_close(closed)
  expect_error(pg_generate(closed, "a", max_tokens = 1, progress = FALSE), "closed", class = "pg_RuntimeError")
  expect_error(pg_generate(list(), "a"), "`model` must be", class = "pg_argument_error")
})

test_that("an explicit seed repeats exactly whatever set.seed() says; R's RNG is untouched", {
  m <- test_model()
  p <- chat_prompt(c("Tell me a short story.", "Write a poem about rain."))
  set.seed(1)
  a <- pg_generate(m, p, max_tokens = 12, temperature = 1, seed = 123, progress = FALSE)
  set.seed(2)
  b <- pg_generate(m, p, max_tokens = 12, temperature = 1, seed = 123, progress = FALSE)
  expect_identical(a$text, b$text)
  other <- pg_generate(m, p, max_tokens = 12, temperature = 1, seed = 1000, progress = FALSE)
  expect_false(identical(a$text, other$text))

  set.seed(5)
  before <- get(".Random.seed", envir = globalenv())
  pg_generate(m, p, max_tokens = 2, temperature = 1, progress = FALSE)
  pg_generate(m, p, max_tokens = 2, temperature = 1, seed = 9, progress = FALSE)
  expect_identical(get(".Random.seed", envir = globalenv()), before)
})

test_that("stop strings, progress, and a model given as a path", {
  m <- test_model()
  free <- pg_generate(m, "one, two, three", max_tokens = 12, temperature = 0, progress = FALSE)
  expect_match(free$text, " six", fixed = TRUE)  # SmolLM2 counts on: ", four, five, six, ..."
  out <- pg_generate(m, "one, two, three", max_tokens = 12, temperature = 0, stop = c("xyz", " six"),
                     progress = FALSE)
  expect_identical(out$finish_reason, "stop")
  expect_identical(out$stop_reason, " six")
  expect_identical(out$text, sub(" six.*", "", free$text))  # the text up to the stop string
  expect_identical(nrow(pg_generate(m, prompts[1:2], max_tokens = 2, progress = TRUE)), 2L)
  expect_error(pg_generate(m, "a", progress = NA), "`progress`", class = "pg_argument_error")
  by_path <- pg_generate(smollm2_path(), prompts[1], max_tokens = 4, temperature = 0, progress = FALSE)
  expect_identical(nrow(by_path), 1L)
  expect_true(by_path$finish_reason %in% c("stop", "length"))
  expect_identical(by_path$prompt_tokens, pg_generate(m, prompts[1], max_tokens = 1, progress = FALSE)$prompt_tokens)
})

test_that("n samples per prompt: one row per sample, with index and sample columns", {
  m <- test_model()
  out <- pg_generate(m, prompts[1:2], n = 2, max_tokens = 4, temperature = 1, seed = 1,
                     ignore_eos = TRUE, progress = FALSE)
  expect_named(out, c("index", "sample", columns))
  expect_identical(out$index, c(1L, 1L, 2L, 2L))
  expect_identical(out$sample, c(1L, 2L, 1L, 2L))
  expect_identical(out$prompt, prompts[c(1, 1, 2, 2)])
  expect_identical(out$completion_tokens, rep(4L, 4))
  expect_identical(pg_stats()$completion_tokens, 16L)
  expect_error(pg_generate(m, "a", n = 1.5), "`n`", class = "pg_argument_error")
})

test_that("pg_stats(): the last call's statistics as a one-row data.frame", {
  m <- test_model()
  out <- pg_generate(m, prompts[1:3], max_tokens = 4, temperature = 0, ignore_eos = TRUE, progress = FALSE)
  s <- pg_stats()
  expect_s3_class(s, "data.frame")
  expect_identical(nrow(s), 1L)
  expect_identical(s$prompts, 3L)
  expect_identical(s$completion_tokens, 12L)
  expect_identical(s$completion_tokens, sum(out$completion_tokens))
  expect_true(s$wall_seconds > 0)
  expect_true(s$decode_calls >= 4L)
  expect_identical(pg_stats(out), s)
  expect_identical(attr(out, "stats"), s)
  both <- rbind(s, pg_stats(pg_generate(m, "x", max_tokens = 1, progress = FALSE)))
  expect_identical(nrow(both), 2L)
  expect_error(pg_stats(data.frame()), class = "pg_argument_error")
})

test_that("pg_use_python(): checks the Python in use and explains what is missing", {
  info <- pg_use_python()
  expect_true(file.exists(info$python))
  expect_type(info$version, "character")
  expect_true(pg_available())
  expect_silent(pg_use_python(python = info$python))  # the one in use: fine
  expect_error(pg_use_python(python = "/nonexistent/bin/python"), "restart R", class = "pg_argument_error")
  expect_error(pg_use_python(virtualenv = "a", python = "b"), "not both", class = "pg_argument_error")
  e <- catch_error(parallelgen:::.import_or_explain("parallel_gen_no_such_module"))
  expect_s3_class(e, "pg_python_missing")
  expect_match(conditionMessage(e), "'parallel_gen_no_such_module' cannot be imported", fixed = TRUE)
  expect_match(conditionMessage(e), "pg_use_python(virtualenv = ", fixed = TRUE)
  expect_match(conditionMessage(e), "reticulate::use_virtualenv(", fixed = TRUE)
})

test_that("cache = a directory or a Redis URL answers repeated greedy prompts without decoding", {
  # A Model whose prefills never start from reused KV: results that did are not stored
  # (their rounding depends on what ran before), and the shared test model reuses a lot.
  m <- pg_model(smollm2_path(), n_parallel = 2, n_ctx = 256, n_threads = 1, prompt_cache = FALSE,
                share_prefix = FALSE)
  on.exit(pg_close(m), add = TRUE)
  dir <- tempfile("pg-cache-")
  first <- pg_generate(m, prompts[1:2], max_tokens = 6, temperature = 0, progress = FALSE, cache = dir)
  expect_identical(pg_stats()$cache_hits, 0L)
  again <- pg_generate(m, prompts[1:2], max_tokens = 6, temperature = 0, progress = FALSE, cache = dir)
  expect_identical(pg_stats()$cache_hits, 2L)
  expect_identical(again$text, first$text)
  expect_error(pg_generate(m, prompts[1], cache = c("a", "b")), class = "pg_error")

  # A real redis-server on a free loopback port (.ci/run installs it).
  exe <- Sys.which("redis-server")
  expect_true(nzchar(exe), info = "redis-server is missing: apt-get install redis-server")
  socket <- reticulate::import("socket")
  s <- socket$socket()
  s$bind(reticulate::tuple("127.0.0.1", 0L))
  port <- s$getsockname()[[2L]]
  s$close()
  pidfile <- tempfile("redis-pid-")
  system2(exe, c("--port", port, "--bind", "127.0.0.1", "--save", "''", "--appendonly", "no",
                 "--daemonize", "yes", "--pidfile", pidfile), stdout = FALSE)
  on.exit(tools::pskill(as.integer(readLines(pidfile))), add = TRUE)
  url <- sprintf("redis://127.0.0.1:%d/0", as.integer(port))
  for (i in 1:100) if (file.exists(pidfile) && length(readLines(pidfile, warn = FALSE))) break else Sys.sleep(0.05)
  first <- pg_generate(m, prompts[3], max_tokens = 6, temperature = 0, progress = FALSE, cache = url)
  again <- pg_generate(m, prompts[3], max_tokens = 6, temperature = 0, progress = FALSE, cache = url)
  expect_identical(pg_stats()$cache_hits, 1L)
  expect_identical(again$text, first$text)
})
