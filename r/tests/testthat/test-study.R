# pg_compare() and pg_agreement() on the labelled review set the Python tests ship
# (tests/data/reviews_gold.csv), against pg_classify() and Python's parallel_gen.agreement.

sentiments <- c("positive", "negative", "neutral")
templates <- c(plain = "Text: {text}\nSentiment ({labels}):", review = "Review: {text}\nThe review is")
gold_set <- function(n = 8L) {
  path <- testthat::test_path("..", "..", "..", "tests", "data", "reviews_gold.csv")
  utils::head(utils::read.csv(path, stringsAsFactors = FALSE), n)
}

test_that("pg_agreement: tidy tables equal to Python's agreement, missing labels counted", {
  codings <- list(ann = c("a", "b", NA, "a", "b"), bob = c("a", "a", "b", "a", "b"))
  gold <- c("a", "b", "b", "a", "a")
  a <- pg_agreement(codings, gold = gold, labels = c("a", "b"), n_boot = 200L)
  expect_s3_class(a, "pg_agreement")
  expect_identical(a$coders_vs_gold$coder, c("ann", "bob"))
  expect_identical(a$coders_vs_gold$missing, c(1L, 0L))
  expect_equal(a$coders_vs_gold$accuracy, c(3 / 4, 3 / 5))
  expect_true(all(a$coders_vs_gold$accuracy_low <= a$coders_vs_gold$accuracy))
  expect_named(a$confusion, c("coder", "gold", "label", "count"))
  expect_equal(sum(a$confusion$count[a$confusion$coder == "ann"]), 4)
  expect_identical(nrow(a$per_class), 4L)
  expect_identical(a$pairs$n, 4L)
  py <- reticulate::import("parallel_gen", convert = TRUE)$agreement(
    list(ann = list("a", "b", NULL, "a", "b"), bob = list("a", "a", "b", "a", "b")), as.list(gold),
    labels = list("a", "b"), n_boot = 200L)
  expect_equal(a$alpha$alpha, py$alpha$alpha$value)
  expect_equal(a$pairs$kappa_low, py$pairs[[1]]$kappa$low)
  expect_output(print(a), "Krippendorff's alpha \\(nominal\\)")
  # a long data.frame with a gold column gives the same
  long <- data.frame(doc = rep(1:5, 2), who = rep(c("ann", "bob"), each = 5),
                     code = unlist(codings), truth = rep(gold, 2), stringsAsFactors = FALSE)
  b <- pg_agreement(long, gold = "truth", labels = c("a", "b"), n_boot = 200L, item = "doc", coder = "who",
                    label = "code")
  expect_equal(b$coders_vs_gold, a$coders_vs_gold)
  expect_equal(b$alpha, a$alpha)
})

test_that("pg_agreement: bad input is a clear error", {
  expect_error(pg_agreement(list(x = c("a", "b"), y = c("a", "a")), gold = c("a", "zebra"), labels = c("a", "b")),
               "gold label 'zebra'", class = "pg_ParamError")
  expect_error(pg_agreement(list(x = c("a", "b"), y = c("a", "a")), gold = c("a", NA)),
               "gold has no label for 1 of 2 items", class = "pg_ParamError")
  expect_error(pg_agreement(list(x = c("a", "b"))), "one coder", class = "pg_ParamError")
  expect_error(pg_agreement(data.frame(item = 1, label = "a")), "no column \"coder\"", class = "pg_argument_error")
})

test_that("pg_compare: codings are pg_classify's per model and template, with the agreement and plots", {
  m <- test_model()
  d <- gold_set()
  study <- pg_compare(list(smol = m), d$text, sentiments, gold = d$gold, templates = templates, n_boot = 200L)
  expect_s3_class(study, "pg_comparison")
  cod <- study$codings
  expect_identical(nrow(cod), 2L * nrow(d))
  expect_identical(unique(cod$coder), c("smol/plain", "smol/review"))
  expect_identical(cod$item[cod$coder == "smol/plain"], seq_len(nrow(d)))
  expect_identical(cod$gold[seq_len(nrow(d))], d$gold)
  for (t in names(templates)) {
    expected <- pg_classify(m, d$text, sentiments, template = templates[[t]])
    got <- cod[cod$template == t, ]
    expect_identical(got$label, expected$label)
    expect_equal(got$p_positive, expected$positive, tolerance = 1e-9)
  }
  expect_identical(study$agreement$coders_vs_gold$coder, c("smol/plain", "smol/review"))
  expect_equal(pg_agreement(study, n_boot = 200L)$coders_vs_gold, study$agreement$coders_vs_gold)
  png <- tempfile(fileext = ".png")
  plot(study, file = png)
  expect_identical(readBin(png, "raw", 4L), as.raw(c(0x89, 0x50, 0x4e, 0x47)))
  pdf_file <- tempfile(fileext = ".pdf")
  grDevices::pdf(pdf_file)
  plot(study$agreement)
  grDevices::dev.off()
  expect_gt(file.size(pdf_file), 1000)
  expect_error(pg_compare(list(smol = m), d$text, sentiments, gold = c(d$gold[-1], "great")),
               "gold label 'great'", class = "pg_ParamError")
})
