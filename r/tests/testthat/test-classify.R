# pg_classify() on the real SmolLM2 model, against Python's parallel_gen.classify.

reviews <- c("I loved this movie, it was wonderful!", "Terrible food and rude staff.",
             "The parcel arrived on Tuesday.")
sentiments <- c("positive", "negative", "neutral")

# Python's classify on the same Model object: list(labels, probs (texts x labels), label).
py_classify <- function(m, texts, labels, ...) {
  res <- reticulate::import("parallel_gen", convert = FALSE)$classify(
    parallelgen:::.py_model(m), as.list(texts), as.list(labels), ...)
  rows <- reticulate::py_to_r(res$probs$tolist())  # a list of rows: no numpy conversion needed
  list(labels = reticulate::py_to_r(res$labels),
       probs = matrix(as.double(unlist(rows)), nrow = length(texts), byrow = TRUE),
       label = vapply(seq_along(texts) - 1L, function(i) {
         lab <- reticulate::py_to_r(reticulate::py_get_item(res, i)$label)
         if (is.null(lab)) NA_character_ else lab
       }, ""))
}

prob_matrix <- function(out, labels) unname(as.matrix(out[, labels, drop = FALSE]))

test_that("pg_classify: one row per text, probabilities summing to 1, the argmax label, Python's numbers", {
  m <- test_model()
  out <- pg_classify(m, reviews, sentiments)
  expect_s3_class(out, "data.frame")
  expect_named(out, c("text", "label", sentiments, "error"))
  expect_identical(out$text, reviews)
  expect_type(out$positive, "double")
  expect_true(all(is.na(out$error)))
  p <- prob_matrix(out, sentiments)
  expect_true(all(p > 0 & p < 1))
  expect_equal(rowSums(p), rep(1, 3), tolerance = 1e-12)
  expect_identical(out$label, sentiments[max.col(p, ties.method = "first")])
  expect_identical(out$label[1:2], c("positive", "negative"))  # clear cases for the model

  py <- py_classify(m, reviews, sentiments)
  expect_identical(py$labels, sentiments)
  expect_equal(p, py$probs, tolerance = 1e-12)
  expect_identical(out$label, py$label)
})

test_that("a text too long for the context is an error row; the other texts are unaffected", {
  m <- test_model()  # n_ctx 256
  long <- paste(rep("word", 400), collapse = " ")
  out <- pg_classify(m, c(reviews[1], long, reviews[2]), sentiments)
  expect_identical(nrow(out), 3L)
  expect_match(out$error[2], "longer than a sequence's n_ctx=256", fixed = TRUE)
  expect_true(is.na(out$label[2]))
  failed <- prob_matrix(out, sentiments)[2, ]
  expect_true(all(is.na(failed) & !is.nan(failed)))  # NA, not Python's NaN (waldo calls them equal)
  expect_true(all(is.na(out$error[-2])))
  alone <- pg_classify(m, reviews[1:2], sentiments)
  expect_equal(prob_matrix(out, sentiments)[-2, ], prob_matrix(alone, sentiments), tolerance = 1e-6)
  expect_identical(out$label[-2], alone$label)
  expect_identical(py_classify(m, c(reviews[1], long, reviews[2]), sentiments)$label, out$label)
})

test_that("chat = TRUE with a system message scores the labels as the assistant's answer, as Python does", {
  m <- test_model()
  sys <- "You label the sentiment of reviews."
  out <- pg_classify(m, reviews[1:2], c("positive", "negative"), chat = TRUE, system = sys)
  p <- prob_matrix(out, c("positive", "negative"))
  expect_equal(rowSums(p), c(1, 1), tolerance = 1e-12)
  expect_identical(out$label, c("positive", "negative"))
  py <- py_classify(m, reviews[1:2], c("positive", "negative"), chat = TRUE, system = sys)
  expect_equal(p, py$probs, tolerance = 1e-12)
  plain <- pg_classify(m, reviews[1:2], c("positive", "negative"))
  expect_false(isTRUE(all.equal(p, prob_matrix(plain, c("positive", "negative")))))  # chat really used
})

test_that("normalize and template reach Python; an R function works as a template", {
  m <- test_model()
  labels <- c("good", "very bad indeed")  # labels of different token lengths: sum and mean differ
  total <- pg_classify(m, reviews[1:2], labels)
  mean <- pg_classify(m, reviews[1:2], labels, normalize = "mean")
  expect_equal(prob_matrix(mean, labels), py_classify(m, reviews[1:2], labels, normalize = "mean")$probs,
               tolerance = 1e-12)
  expect_false(isTRUE(all.equal(prob_matrix(mean, labels), prob_matrix(total, labels))))

  tmpl <- "Review: {text}\nIs the review good or very bad indeed? Answer:"
  by_string <- pg_classify(m, reviews[1:2], labels, template = tmpl)
  by_function <- pg_classify(m, reviews[1:2], labels,
                             template = function(text) sub("{text}", text, tmpl, fixed = TRUE))
  expect_identical(by_function, by_string)
  expect_false(isTRUE(all.equal(prob_matrix(by_string, labels), prob_matrix(total, labels))))
})

test_that("edge cases: no texts, factors, one label, labels named like the fixed columns", {
  m <- test_model()
  none <- pg_classify(m, character(0), c("a", "b"))
  expect_identical(nrow(none), 0L)
  expect_named(none, c("text", "label", "a", "b", "error"))
  f <- pg_classify(m, factor(reviews[1]), factor(c("positive", "negative")))
  expect_identical(f$text, reviews[1])
  expect_identical(f$label, "positive")
  one <- pg_classify(m, reviews[1], "positive")
  expect_identical(one$positive, 1)
  clash <- pg_classify(m, reviews[1], c("error", "text", "fine"))
  expect_named(clash, c("text", "label", "p_error", "p_text", "fine", "error"))
  expect_equal(sum(clash[1, c("p_error", "p_text", "fine")]), 1, tolerance = 1e-12)
  expect_true(is.na(clash$error))
})

test_that("a progress bar leaves the result unchanged", {
  m <- test_model()
  texts <- c("I loved it.", "Awful.")
  with_bar <- pg_classify(m, texts, c("positive", "negative"), progress = TRUE)  # or a note: no tqdm
  expect_equal(with_bar, pg_classify(m, texts, c("positive", "negative"), progress = FALSE), tolerance = 1e-12)
})

test_that("bad arguments are R errors naming the argument, before any work", {
  m <- test_model()
  arg_error <- function(expr, pattern) {
    expect_error(expr, pattern, fixed = TRUE, class = "pg_argument_error")
  }
  arg_error(pg_classify(m, "x", character(0)), "`labels` is empty")
  arg_error(pg_classify(m, "x", NULL), "`labels` must be a character vector")
  arg_error(pg_classify(m, "x", c("pos", "neg", "pos")), "labels[3] (\"pos\") repeats labels[1]")
  arg_error(pg_classify(m, "x", c("pos", "")), "labels[2] is \"\"")
  arg_error(pg_classify(m, "x", c("pos", NA)), "labels[2] is NA")
  arg_error(pg_classify(m, "x", 1:2), "`labels` must be a character vector")
  arg_error(pg_classify(m, "x", c("error", "p_error")), "rename one")
  arg_error(pg_classify(m, 1:3, "pos"), "`texts` must be a character vector")
  arg_error(pg_classify(m, list("a", "b"), "pos"), "`texts` must be a character vector")
  arg_error(pg_classify(m, c("a", NA), "pos"), "texts[2] is NA")
  arg_error(pg_classify(m, "x", "pos", normalize = "max"), "`normalize` must be one of \"sum\", \"mean\"")
  arg_error(pg_classify(m, "x", "pos", chat = NA), "`chat` must be TRUE or FALSE")
  arg_error(pg_classify(m, "x", "pos", progress = "yes"), "`progress` must be TRUE or FALSE")
  arg_error(pg_classify(m, "x", "pos", system = "Be brief."), "`system` needs `chat = TRUE`")
  arg_error(pg_classify(m, "x", "pos", chat_template = "chatml"), "`chat_template` needs `chat = TRUE`")
  arg_error(pg_classify(m, "x", "pos", template = 3), "`template` must be one non-empty string")
  arg_error(pg_classify(42, "x", "pos"), "`model` must be a model from pg_model()")
  expect_error(pg_classify(m, "x", "pos", template = "no field"), "has no {text} field", fixed = TRUE,
               class = "pg_ValueError")
  expect_error(pg_classify(m, "x", "pos", template = function(text) c("a", "b")), "must return a str",
               class = "pg_TypeError")
})

# pg_classify_file(): Python's parallel_gen.jobs.classify_file from R.

file_reviews <- c(reviews, "Best purchase I have made all year.", "It broke after two days.")

write_reviews <- function(dir) write_id_csv(dir, "reviews.csv", "review", file_reviews, "r")

test_that("pg_classify_file: one row per input row, ids carried, p_<label> columns equal to pg_classify's", {
  m <- test_model()
  dir <- job_dir()
  output <- file.path(dir, "labels.csv")
  s <- pg_classify_file(m, write_reviews(dir), output, sentiments, text_column = "review", progress = FALSE)
  expect_s3_class(s, "data.frame")
  expect_identical(c(s$rows, s$written, s$skipped, s$failed, s$completion_tokens), c(5L, 5L, 0L, 0L, 0L))
  expect_equal(s$rows_per_second, s$written / s$seconds, tolerance = 1e-9)  # not the 0 tokens/s
  expect_gt(s$rows_per_second, 0)
  expect_true(s$prompt_tokens > 0L)
  out <- read.csv(output, stringsAsFactors = FALSE)
  p_cols <- paste0("p_", sentiments)
  expect_named(out, c("id", "review", "row", "label", p_cols, "error", "error_code"))
  expect_identical(out$id, sprintf("r-%d", 1:5))
  expect_identical(out$review, file_reviews)
  expect_identical(out$row, 0:4)
  expect_true(all(is.na(out$error)))
  direct <- pg_classify(m, file_reviews, sentiments)
  expect_equal(unname(as.matrix(out[, p_cols])), prob_matrix(direct, sentiments), tolerance = 1e-9)
  expect_identical(out$label, direct$label)

  # the same options reach Python: chat with a system message and normalize = "mean"
  sys <- "You label the sentiment of reviews."
  chat_out <- file.path(dir, "chat.jsonl")
  pg_classify_file(m, write_reviews(dir), chat_out, c("positive", "negative"), text_column = "review",
                   system = sys, normalize = "mean", progress = FALSE)
  rows <- lapply(readLines(chat_out), reticulate::import("json")$loads)
  chat_direct <- pg_classify(m, file_reviews, c("positive", "negative"), chat = TRUE, system = sys,
                             normalize = "mean")
  expect_equal(t(vapply(rows, function(r) c(r$p_positive, r$p_negative), c(0, 0))),
               prob_matrix(chat_direct, c("positive", "negative")), tolerance = 1e-9)
})

test_that("pg_classify_file: a cut job resumes to the full run; an existing output is protected", {
  m <- test_model()
  dir <- job_dir()
  input <- write_reviews(dir)
  output <- file.path(dir, "labels.csv")
  pg_classify_file(m, input, output, sentiments, text_column = "review", progress = FALSE)
  full <- readLines(output)
  expect_length(full, 6L)  # the header and 5 rows (no text holds a newline)

  writeLines(full[1:3], output)  # the header and two rows: a job stopped part way
  s <- pg_classify_file(m, input, output, sentiments, text_column = "review", resume = TRUE, progress = FALSE)
  expect_identical(c(s$rows, s$written, s$skipped), c(5L, 3L, 2L))
  expect_identical(readLines(output), full)

  e <- catch_error(pg_classify_file(m, input, output, sentiments, text_column = "review", progress = FALSE))
  expect_s3_class(e, c("pg_JobInputError", "pg_python_error"))
  expect_match(conditionMessage(e), "overwrite", fixed = TRUE)
  expect_identical(readLines(output), full)  # untouched
  e <- catch_error(pg_classify_file(m, input, output, c("good", "bad"), text_column = "review", resume = TRUE,
                                    progress = FALSE))
  expect_s3_class(e, "pg_JobInputError")  # written with other labels: not resumable
  expect_match(conditionMessage(e), "other --labels", fixed = TRUE)
  expect_identical(readLines(output), full)
})

test_that("pg_classify_file: a row without text is an error row; bad arguments stop before any file", {
  m <- test_model()
  dir <- job_dir()
  input <- write_id_csv(dir, "in.csv", "text", c(reviews[1], "", reviews[2]), "t")
  s <- pg_classify_file(m, input, file.path(dir, "out.csv"), c("positive", "negative"), progress = FALSE)
  expect_identical(c(s$rows, s$failed), c(3L, 1L))
  out <- read.csv(file.path(dir, "out.csv"), stringsAsFactors = FALSE, na.strings = "")  # CSV: None is ""
  expect_match(out$error[2], "'text' is missing or empty", fixed = TRUE)
  expect_true(all(is.na(c(out$label[2], out$p_positive[2], out$p_negative[2]))))
  expect_true(all(is.na(out$error[c(1, 3)])))
  expect_identical(out$label[c(1, 3)], c("positive", "negative"))

  output <- file.path(dir, "never.csv")
  arg_error <- function(expr, pattern) {
    expect_error(expr, pattern, fixed = TRUE, class = "pg_argument_error")
  }
  arg_error(pg_classify_file(m, input, output, character(0)), "`labels` is empty")
  arg_error(pg_classify_file(m, input, output, c("pos", "neg", "pos")), "labels[3] (\"pos\") repeats labels[1]")
  arg_error(pg_classify_file(m, input, output, c("pos", NA)), "labels[2] is NA")
  arg_error(pg_classify_file(m, input, output, 1:2), "`labels` must be a character vector")
  arg_error(pg_classify_file(m, input, output, "pos", text_column = ""), "`text_column` must be one non-empty")
  arg_error(pg_classify_file(m, input, output, "pos", normalize = "max"), "`normalize` must be one of")
  arg_error(pg_classify_file(m, input, output, "pos", template = 3), "`template` must be one non-empty string")
  arg_error(pg_classify_file(m, input, output, "pos", resume = NA), "`resume` must be TRUE or FALSE")
  arg_error(pg_classify_file(m, NA_character_, output, "pos"), "`input` must be one non-empty string")
  expect_error(pg_classify_file(m, input, output, "pos", template = "no field", progress = FALSE),
               "has no {text} field", fixed = TRUE, class = "pg_ValueError")
  expect_error(pg_classify_file(m, input, output, "pos", text_column = "review", progress = FALSE),
               "review", class = "pg_JobInputError")
  expect_false(file.exists(output))
})
