test_that("pg_model() returns an S3 object that prints its settings and reads the Python Model", {
  m <- test_model()
  expect_s3_class(m, "pg_model")
  expect_identical(m$n_parallel, 4L)
  expect_identical(m$n_ctx, 256L)
  expect_identical(m$n_threads, 1L)
  expect_false(m$closed)
  expect_error(m$no_such_setting, "no setting `no_such_setting`", fixed = TRUE, class = "pg_argument_error")
  shown <- capture.output(res <- print(m))
  expect_identical(res, m)  # print returns its argument, invisibly
  expect_match(shown, "^<pg_model> .*\\.gguf: n_parallel 4, n_ctx 256, n_batch [0-9]+, 1 thread\\(s\\), KV f16/f16")
  expect_identical(shown, format(m))

  other <- pg_model(smollm2_path(), n_parallel = 2, n_ctx = 64, n_threads = 1, type_k = "q8_0")
  expect_match(format(other), "n_parallel 2, n_ctx 64, .*KV q8_0/f16", perl = TRUE)
  pg_close(other)
  expect_true(other$closed)
  expect_match(format(other), "^<pg_model> .*\\.gguf \\(closed\\)$")
  expect_error(pg_generate(other, "a", max_tokens = 1, progress = FALSE), "closed", class = "pg_RuntimeError")
  expect_null(pg_close(other))  # closing twice is fine
})

test_that("pg_model(repack = FALSE) loads without llama.cpp's extra buffer types and generates", {
  m <- pg_model(smollm2_path(), n_parallel = 2, n_ctx = 128, n_threads = 1, repack = FALSE)
  on.exit(pg_close(m))
  expect_false(m$repack)
  expect_match(format(m), ", repack off$")
  out <- pg_generate(m, c("The capital of France is", "Once upon a time"), max_tokens = 4, temperature = 0,
                     progress = FALSE)
  expect_identical(out$finish_reason, c("length", "length"))
  default <- test_model()  # repack = NULL: llama.cpp's default unless the build has AMX kernels
  amx <- reticulate::import("parallel_gen.repack")$cpu_build()$amx_kernels
  expect_identical(default$repack, !amx)
  expect_error(pg_model(smollm2_path(), n_parallel = 1, n_ctx = 64, repack = "yes"), "repack",
               class = "pg_TypeError")
})

test_that("functions taking a model reject what is not one, by class", {
  expect_error(pg_close("model.gguf"), "`model` must be a model from pg_model()", fixed = TRUE,
               class = "pg_argument_error")
  py_model <- .subset2(test_model(), "py")  # the bare Python object is not a pg_model
  expect_error(pg_generate(py_model, "a"), "`model` must be a model from pg_model()", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_model(c("a.gguf", "b.gguf")), "`path` must be a single file path", class = "pg_argument_error")
})

test_that("errors are classed conditions built with errorCondition(), caught by class", {
  e <- catch_error(pg_generate(test_model(), NA_character_))
  expect_identical(class(e), c("pg_argument_error", "pg_error", "error", "condition"))
  expect_identical(tryCatch(pg_generate(test_model(), 1), pg_error = function(e) "pg_error caught"),
                   "pg_error caught")
  p <- catch_error(pg_generate(test_model(), "a", top_p = 2, progress = FALSE))
  expect_identical(class(p), c("pg_ParamError", "pg_ValueError", "pg_Exception", "pg_BaseException",
                               "pg_python_error", "pg_error", "error", "condition"))
  expect_identical(p$python_class, "ParamError")
  expect_true(inherits(p$python_exception, "python.builtin.object"))
  # Not caught by an unrelated class: the handler for pg_argument_error lets it through.
  expect_error(tryCatch(pg_generate(test_model(), "a", top_p = 2, progress = FALSE),
                        pg_argument_error = function(e) "wrong handler"),
               class = "pg_ValueError")
})
