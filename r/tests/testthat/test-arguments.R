# The R arguments against Python's SamplingParams and ModelConfig, and the options that
# need converting.

dataclass_fields <- function(cls) {
  reticulate::py_eval(paste(
    "[{'name': f.name, 'type': str(f.type), 'default': f.default}",
    sprintf("for f in __import__('dataclasses').fields(__import__('parallel_gen').%s)]", cls)), convert = TRUE)
}
sampling_fields <- function() dataclass_fields("SamplingParams")

test_that("pg_generate() and pg_chat() take every SamplingParams field, with Python's defaults", {
  fields <- sampling_fields()
  names <- vapply(fields, `[[`, "", "name")
  dots <- parallelgen:::.SAMPLING_DOTS
  for (f in list(pg_generate, pg_chat)) {
    explicit <- intersect(names(formals(f)), names)
    expect_identical(explicit, c("max_tokens", "temperature", "seed", "stop"))
    expect_setequal(c(explicit, dots), names)  # every field, no unknown option
    expect_length(intersect(explicit, dots), 0L)
    for (fld in fields[match(explicit, names)]) {
      r_default <- eval(formals(f)[[fld$name]])
      py_default <- fld$default
      if (is.null(py_default) || identical(py_default, list())) {
        expect_null(r_default, label = fld$name)
      } else {
        expect_identical(as.double(r_default), as.double(py_default), label = fld$name)
      }
    }
  }
  expect_identical(names(formals(pg_chat))[c(1:2, 8:9)], c("model", "conversations", "system", "progress"))

  # Every option of `...` is documented in pg_generate's help.
  rd <- paste(as.character(tools::Rd_db("parallelgen")[["pg_generate.Rd"]]), collapse = "")
  undocumented <- dots[!vapply(sprintf("\\code{%s}", dots), grepl, logical(1), rd, fixed = TRUE)]
  expect_identical(undocumented, character(0))
})

test_that("pg_model() takes every ModelConfig field and leaves its defaults to Python", {
  fields <- dataclass_fields("ModelConfig")
  names <- vapply(fields, `[[`, "", "name")
  dots <- parallelgen:::.MODEL_DOTS
  explicit <- setdiff(names(formals(pg_model)), c("path", "..."))
  expect_identical(explicit, c("n_parallel", "n_ctx", "repack"))
  expect_setequal(c(explicit, dots), names)  # every field, no unknown option
  expect_length(intersect(explicit, dots), 0L)
  for (name in explicit) expect_null(eval(formals(pg_model)[[name]]), label = name)  # ModelConfig's default
  rd <- paste(as.character(tools::Rd_db("parallelgen")[["pg_model.Rd"]]), collapse = "")
  undocumented <- dots[!vapply(sprintf("\\code{%s}", dots), grepl, logical(1), rd, fixed = TRUE)]
  expect_identical(undocumented, character(0))
  # Whole doubles reach Python as int for every int field of ModelConfig.
  type_of <- setNames(vapply(fields, `[[`, "", "type"), names)
  expect_setequal(intersect(parallelgen:::.INT_ARGS, names), names[type_of %in% c("int", "Optional[int]")])
  default <- reticulate::py_eval("__import__('parallel_gen').ModelConfig()", convert = FALSE)
  m <- pg_model(smollm2_path(), n_ctx = 64, n_threads = 1, n_batch = 64, share_prefix = FALSE)
  expect_identical(m$n_parallel, reticulate::py_to_r(default$n_parallel))
  expect_identical(c(m$n_batch, m$n_ctx), c(64L, 64L))
  config <- reticulate::py_get_attr(.subset2(m, "py"), "config")
  expect_false(reticulate::py_to_r(reticulate::py_get_attr(config, "share_prefix")))
  pg_close(m)
})

test_that("R converts each SamplingParams field to the Python type it declares", {
  fields <- sampling_fields()
  type_of <- setNames(vapply(fields, `[[`, "", "type"), vapply(fields, `[[`, "", "name"))
  ints <- names(type_of)[type_of %in% c("int", "Optional[int]")]
  expect_setequal(intersect(parallelgen:::.INT_ARGS, names(type_of)), ints)
  expect_setequal(names(type_of)[grepl("^(Optional\\[)?Tuple\\[int", type_of)], parallelgen:::.INT_LIST_ARGS)
  expect_setequal(names(type_of)[grepl("^(Optional\\[)?Tuple\\[str", type_of)], parallelgen:::.STR_LIST_ARGS)
  expect_identical(names(type_of)[grepl("Mapping[int, float]", type_of, fixed = TRUE)], "logit_bias")
  # Whole doubles, the R default number type, reach Python as int for every int field.
  m <- test_model()
  out <- pg_generate(m, chat_prompt("Hi"), max_tokens = 2, temperature = 0, n = 1, top_k = 5, repeat_last_n = 8,
                     seed = 1, logprobs = 2, stop_token_ids = c(1, 2), choices = c("yes", "no"), progress = FALSE)
  expect_true(out$text %in% c("yes", "no", "y", "n", "ye"))
  expect_s3_class(out$logprobs[[1]], "data.frame")
})

first_token <- function(m, prompt, ...) {
  lp <- pg_generate(m, prompt, max_tokens = 1, temperature = 0, logprobs = 1, progress = FALSE, ...)$logprobs[[1]]
  lp$token_id[lp$rank == 0]
}

test_that("logit_bias: a numeric vector named by token id changes what is generated", {
  m <- test_model()
  p <- chat_prompt("What is the capital of France?")
  greedy <- first_token(m, p)
  banned <- first_token(m, p, logit_bias = setNames(-Inf, greedy))
  expect_false(identical(banned, greedy))
  forced <- first_token(m, p, logit_bias = c("28" = 100))  # a token the model would not pick
  expect_identical(forced, 28L)
  both <- first_token(m, p, logit_bias = setNames(c(-Inf, 100), c(greedy, 28)))
  expect_identical(both, 28L)
  expect_identical(first_token(m, p, logit_bias = numeric(0)), greedy)  # empty: no bias

  expect_error(pg_generate(m, p, logit_bias = c(-Inf)), "named by token id", class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c(a = 1)), "names(logit_bias)[1] is \"a\"", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c("1" = 1, "-2" = 1)), "names(logit_bias)[2]", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c("12" = 1, "12" = 2)), "names token 12 twice",
               class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c("12" = NA_real_)), "logit_bias[1]", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = list("12" = 1)), "numeric vector", class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c("99999999999" = 1)), "not a token id", class = "pg_argument_error")
  expect_error(pg_generate(m, p, logit_bias = c("12" = Inf)), "logit_bias", class = "pg_ValueError")
})

test_that("stop_reason: the stop string, the stop token's id, or NA", {
  m <- test_model()
  out <- pg_generate(m, c("one, two, three", "red, green, blue"), max_tokens = 24, temperature = 0,
                     stop = c(" six", ","), progress = FALSE)
  expect_identical(out$stop_reason, c(",", ","))  # both go on with ", ..."
  p <- chat_prompt("Count from one to ten, separated by commas.")
  eos <- pg_generate(m, p, max_tokens = 48, temperature = 0, progress = FALSE)
  expect_identical(eos$finish_reason, "stop")  # the model ends its answer: end-of-generation token
  im_end <- .subset2(m, "py")$tokenize("<|im_end|>", add_special = FALSE)  # the end of SmolLM2's turn
  expect_identical(eos$stop_reason, as.character(unlist(im_end)))
  tok <- first_token(m, p)
  by_token <- pg_generate(m, p, max_tokens = 8, temperature = 0, stop_token_ids = tok, progress = FALSE)
  expect_identical(by_token$finish_reason, "stop")
  expect_identical(by_token$stop_reason, as.character(tok))
  expect_identical(by_token$completion_tokens, 1L)
  cut <- pg_generate(m, c(p, ""), max_tokens = 2, temperature = 0, ignore_eos = TRUE, progress = FALSE)
  expect_identical(cut$finish_reason, c("length", "error"))
  expect_identical(cut$stop_reason, c(NA_character_, NA_character_))
})

test_that("logprobs: a list column of data.frames, one row per generated token and rank", {
  m <- test_model()
  p <- chat_prompt(c("Name a colour.", "Say hi."))
  out <- pg_generate(m, p, max_tokens = 5, temperature = 0, ignore_eos = TRUE, logprobs = 3, progress = FALSE)
  expect_type(out$logprobs, "list")
  expect_length(out$logprobs, 2L)
  for (i in 1:2) {
    lp <- out$logprobs[[i]]
    expect_named(lp, c("position", "rank", "token_id", "token", "logprob"))
    expect_identical(lp$position, rep(1:5, each = 4))
    expect_identical(lp$rank, rep(0:3, times = 5))
    expect_true(all(lp$logprob <= 0))
    top <- split(lp, lp$position)
    for (pos in top) {
      expect_true(all(diff(pos$logprob[-1]) <= 0))                     # alternatives best first
      expect_identical(pos$token_id[1], pos$token_id[2])               # greedy picks the best
      expect_equal(pos$logprob[1], pos$logprob[2])
    }
    expect_identical(paste(lp$token[lp$rank == 0], collapse = ""), out$text[i])
  }
  # The same figures Python reports for the same call.
  pg <- reticulate::import("parallel_gen", convert = FALSE)
  py <- pg$generate_parallel(.subset2(m, "py"), p[1], max_tokens = 5L, temperature = 0, ignore_eos = TRUE,
                             logprobs = 3L)
  py_lp <- reticulate::py_eval("lambda r: [t.logprob for t in r[0].outputs[0].logprobs]")(py)
  expect_equal(out$logprobs[[1]]$logprob[out$logprobs[[1]]$rank == 0], unlist(py_lp))

  zero <- pg_generate(m, p[1], max_tokens = 2, temperature = 0, logprobs = 0, ignore_eos = TRUE, progress = FALSE)
  expect_identical(zero$logprobs[[1]]$rank, c(0L, 0L))
  expect_null(pg_generate(m, p[1], max_tokens = 1, progress = FALSE)$logprobs)  # not asked: no column
  none <- pg_generate(m, character(0), logprobs = 2, progress = FALSE)
  expect_identical(nrow(none), 0L)
  expect_true("logprobs" %in% names(none))
  samples <- pg_generate(m, p[1], n = 2, max_tokens = 3, temperature = 1, seed = 4, logprobs = 1,
                         ignore_eos = TRUE, progress = FALSE)
  expect_identical(vapply(samples$logprobs, nrow, 1L), c(6L, 6L))
  expect_error(pg_generate(m, "a", logprobs = 2.5), "`logprobs`", class = "pg_argument_error")
  expect_error(pg_generate(m, "a", logprobs = 21, progress = FALSE), "logprobs=21", class = "pg_ValueError")
})
