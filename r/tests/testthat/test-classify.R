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
