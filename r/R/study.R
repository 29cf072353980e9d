# pg_compare() and pg_agreement(): annotation studies (Python's parallel_gen.compare and
# parallel_gen.agreement), one tidy data.frame per section, and their plot() methods.

#' Compare several models and prompt templates on the same texts
#'
#' Every model is crossed with every template (a *coder*); each coder classifies all
#' texts as [pg_classify()] does. Models given as paths are opened one at a time and
#' closed after their templates ran. With gold labels (or two coders or more) the
#' agreement is computed as [pg_agreement()] does.
#'
#' @param models a character vector of `.gguf` paths (named: the names are the models'
#'   names, else the file names), or a (named) list of paths and models from [pg_model()].
#' @param texts a character vector of texts.
#' @param labels the labels, as for [pg_classify()].
#' @param gold `NULL`, or the true label of every text (no `NA`; each one of `labels`).
#' @param templates `NULL` (classify's default prompt), or a named character vector or
#'   list of templates (`{text}`, `{labels}`), one coder per model and template.
#' @param chat,system,normalize,chat_template as for [pg_classify()].
#' @param level,ci,seed,n_boot as for [pg_agreement()].
#' @param n_ctx,n_parallel,n_threads settings for models given as paths (`NULL`: sized
#'   to the texts, the defaults).
#' @return A list of class `pg_comparison`: `codings`, the long table (one row per text
#'   and coder: `item` (1-based), `coder`, `model`, `template`, `gold`, `label`, one
#'   `p_<label>` column per label, `error`), and `agreement` (a [pg_agreement()] result,
#'   or `NULL`). `plot()` draws the agreement.
#' @examples
#' \dontrun{
#' study <- pg_compare(c(smol = "smollm2.gguf", gemma = "gemma3.gguf"), reviews$text,
#'                     c("positive", "negative", "neutral"), gold = reviews$gold,
#'                     templates = c(plain = "Text: {text}\nSentiment ({labels}):",
#'                                   review = "Review: {text}\nThe review is"))
#' study$agreement$coders
#' plot(study)
#' }
#' @export
pg_compare <- function(models, texts, labels, gold = NULL, templates = NULL, chat = FALSE, system = NULL,
                       normalize = c("sum", "mean"), chat_template = NULL, level = c("nominal", "ordinal", "interval"),
                       ci = 0.95, seed = 0L, n_boot = 1000L, n_ctx = NULL, n_parallel = NULL, n_threads = NULL) {
  texts <- .check_strings(texts, "texts")
  labels <- .check_labels(labels)
  if (!is.null(gold)) gold <- as.list(.check_strings(gold, "gold"))
  models <- .study_models(models)
  if (!is.null(templates)) {
    if (is.null(names(templates)) || any(!nzchar(names(templates)))) {
      .arg_error("`templates` must be named: c(plain = \"Text: {text}\\nLabel:\", ...)")
    }
    templates <- as.list(vapply(templates, function(t) .check_string(t, "templates"), ""))
  }
  .check_flag(chat, "chat")
  level <- .check_choice(level, c("nominal", "ordinal", "interval"), "level")
  options <- Filter(Negate(is.null), list(n_ctx = n_ctx, n_parallel = n_parallel, n_threads = n_threads))
  options <- lapply(options, as.integer)
  kwargs <- c(list(templates = templates, chat = chat, level = level, ci = ci, seed = as.integer(seed),
                   n_boot = as.integer(n_boot),
                   model_options = if (length(options)) options else NULL),
              list(normalize = .check_choice(normalize, c("sum", "mean"), "normalize")),
              if (!is.null(system)) list(system = system),
              if (!is.null(chat_template)) list(chat_template = chat_template))
  result <- .py_call(.pg_attr("compare"), list(models, as.list(texts), as.list(labels), gold), kwargs)
  out <- .helpers()$comparison_result(result)
  codings <- .frame(out$codings)
  codings$item <- as.integer(codings$item) + 1L
  structure(list(codings = codings, agreement = if (!is.null(out$agreement)) .agreement(out$agreement)),
            class = "pg_comparison")
}

#' Agreement of coders with gold labels and with each other
#'
#' Per coder against gold: accuracy, per-class precision, recall, F1 and support, macro
#' and weighted F1, Cohen's kappa and the confusion matrix (scikit-learn's). Per pair of
#' coders: percent agreement and Cohen's kappa. All coders: Krippendorff's alpha. With
#' seeded percentile bootstrap intervals (items resampled).
#'
#' @param codings a long data.frame (one row per item and coder), or a named list
#'   coder -> labels in item order (`NA` for a missing label), or a [pg_compare()] result.
#' @param gold `NULL`, the name of a gold column of `codings` (a data.frame), or the true
#'   labels in item order (a named list of coders).
#' @param labels the labels in their order (needed for `level` ordinal and interval).
#' @param level Krippendorff's alpha's metric: "nominal", "ordinal" or "interval".
#' @param ci the intervals' coverage, `NULL` for none.
#' @param seed,n_boot the bootstrap's seed and replicates.
#' @param item,coder,label the columns of a long data.frame.
#' @return A list of class `pg_agreement` of data.frames: `coders_vs_gold` (`n`,
#'   `missing`, `accuracy`, `macro_f1`, `weighted_f1`, `kappa`, with `_low` / `_high`
#'   bounds), `per_class`, `confusion` (long: `coder`, `gold`, `label`, `count`), `pairs`,
#'   `alpha`; `report` (text; `print()` shows it), `labels` and `coders`. `plot()` draws the confusion
#'   matrices and the kappa matrix. Missing labels are counted (`missing`) and left out.
#' @examples
#' \dontrun{
#' pg_agreement(human, gold = "truth", coder = "annotator", label = "code")
#' pg_agreement(list(ann = c("a", "b", NA), bob = c("a", "a", "b")), gold = c("a", "b", "b"))
#' }
#' @export
pg_agreement <- function(codings, gold = NULL, labels = NULL, level = c("nominal", "ordinal", "interval"),
                         ci = 0.95, seed = 0L, n_boot = 1000L, item = "item", coder = "coder", label = "label") {
  level <- .check_choice(level, c("nominal", "ordinal", "interval"), "level")
  if (inherits(codings, "pg_comparison")) {
    codings <- codings$codings
    if (is.null(gold) && "gold" %in% names(codings)) gold <- "gold"
  }
  if (is.data.frame(codings)) {
    for (col in c(item, coder, label, if (is.character(gold) && length(gold) == 1L) gold)) {
      if (!col %in% names(codings)) .arg_error(sprintf("`codings` has no column \"%s\" (it has %s)", col,
                                                       paste(names(codings), collapse = ", ")))
    }
    g <- if (is.character(gold) && length(gold) == 1L) .na_blank(codings[[gold]])
    rows <- .helpers()$codings_records(as.list(as.character(codings[[item]])), as.list(as.character(codings[[coder]])),
                                       as.list(.na_blank(codings[[label]])), if (!is.null(g)) as.list(g))
    py_codings <- rows
    py_gold <- if (!is.null(g)) "gold" else NULL
  } else if (is.list(codings) && !is.null(names(codings))) {
    py_codings <- lapply(codings, function(v) lapply(as.character(v), function(x) if (is.na(x)) NULL else x))
    py_gold <- if (!is.null(gold)) lapply(as.character(gold), function(x) if (is.na(x)) NULL else x)
  } else {
    .arg_error(sprintf("`codings` must be a data.frame, a named list or a pg_compare() result, got %s",
                       .describe(codings)))
  }
  kwargs <- list(labels = if (!is.null(labels)) as.list(.check_labels(labels)), level = level, ci = ci,
                 seed = as.integer(seed), n_boot = as.integer(n_boot))
  .agreement(.helpers()$agreement_result(.py_call(.pg_attr("agreement"), list(py_codings, py_gold), kwargs)))
}

#' @export
print.pg_agreement <- function(x, ...) {
  cat(x$report, "\n", sep = "")
  invisible(x)
}

#' @export
print.pg_comparison <- function(x, ...) {
  cat(sprintf("pg_comparison: %d codings by %d coders\n", nrow(x$codings), length(unique(x$codings$coder))))
  if (!is.null(x$agreement)) print(x$agreement)
  invisible(x)
}

#' Plot an agreement: confusion matrices against gold and the coder x coder kappa matrix
#'
#' @param x a [pg_agreement()] or [pg_compare()] result.
#' @param file `NULL` to draw on the current device (base graphics), or a file name
#'   (`.png`, `.pdf`, ...) written by Python's matplotlib (the figure of
#'   `Agreement.plot()`).
#' @param ... unused.
#' @return `x`, invisibly.
#' @export
plot.pg_agreement <- function(x, file = NULL, ...) {
  if (!is.null(file)) {
    .py_call(reticulate::py_get_attr(x$py, "plot"), list(path.expand(file)))
    return(invisible(x))
  }
  coders <- unique(x$confusion$coder)
  pairs <- x$pairs
  all_coders <- x$coders
  panels <- length(coders) + (length(all_coders) >= 2L)
  old <- graphics::par(mfrow = c(ceiling(panels / 3), min(panels, 3L)), mar = c(5, 6, 3, 1))
  on.exit(graphics::par(old))
  labs <- x$labels
  k <- length(labs)
  for (cd in coders) {
    cm <- x$confusion[x$confusion$coder == cd, ]
    m <- matrix(cm$count, k, k, byrow = TRUE)  # rows gold, columns coder
    share <- m / pmax(rowSums(m), 1)
    graphics::image(seq_len(k), seq_len(k), t(share)[, k:1, drop = FALSE], zlim = c(0, 1), axes = FALSE,
                    col = grDevices::hcl.colors(20, "Blues", rev = TRUE), xlab = "coder's label", ylab = "")
    graphics::axis(1, seq_len(k), labs, las = 2)
    graphics::axis(2, seq_len(k), rev(labs), las = 1)
    graphics::text(rep(seq_len(k), each = k), rep(k:1, k), t(m)[, , drop = TRUE])
    s <- x$coders_vs_gold[x$coders_vs_gold$coder == cd, ]
    graphics::title(sprintf("%s\naccuracy %.3f, kappa %.3f", cd, s$accuracy, s$kappa), cex.main = 0.9)
  }
  if (length(all_coders) >= 2L) {
    n <- length(all_coders)
    m <- diag(n)
    for (r in seq_len(nrow(pairs))) {
      i <- match(pairs$coder_a[[r]], all_coders)
      j <- match(pairs$coder_b[[r]], all_coders)
      m[i, j] <- m[j, i] <- pairs$kappa[[r]]
    }
    graphics::image(seq_len(n), seq_len(n), t(m)[, n:1, drop = FALSE], zlim = c(-1, 1), axes = FALSE,
                    col = grDevices::hcl.colors(21, "RdYlGn"), xlab = "", ylab = "")
    graphics::axis(1, seq_len(n), all_coders, las = 2, cex.axis = 0.7)
    graphics::axis(2, seq_len(n), rev(all_coders), las = 1, cex.axis = 0.7)
    graphics::text(rep(seq_len(n), each = n), rep(n:1, n), sprintf("%.2f", t(m)))
    graphics::title("Cohen's kappa between coders", cex.main = 0.9)
  }
  invisible(x)
}

#' @export
plot.pg_comparison <- function(x, file = NULL, ...) {
  if (is.null(x$agreement)) .arg_error("this comparison has no agreement (one coder and no gold)")
  plot(x$agreement, file = file, ...)
  invisible(x)
}

# Models for pg_compare(): paths and pg_model objects, named or not, as a Python list or dict.
.study_models <- function(models) {
  if (inherits(models, "pg_model")) models <- list(models)
  if (is.character(models)) models <- as.list(models)
  if (!is.list(models) || !length(models)) {
    .arg_error(sprintf("`models` must be paths of .gguf files or models from pg_model(), got %s", .describe(models)))
  }
  py <- lapply(models, .check_model)
  if (!is.null(names(models))) return(reticulate::dict(py))
  unname(py)
}

# Python's {column: list} (None as NULL) -> a data.frame, NULL as NA.
.frame <- function(cols) {
  out <- lapply(cols, function(v) {
    v[vapply(v, is.null, TRUE)] <- NA
    unlist(v)
  })
  as.data.frame(out, stringsAsFactors = FALSE, optional = TRUE)
}

.na_blank <- function(v) {
  v <- as.character(v)
  v[is.na(v)] <- ""
  v
}

# The agreement_result() of the glue as a pg_agreement.
.agreement <- function(res) {
  t <- res$tables
  structure(list(coders_vs_gold = .frame(t$coders), per_class = .frame(t$per_class), confusion = .frame(t$confusion),
                 pairs = .frame(t$pairs), alpha = .frame(t$alpha), report = res$report,
                 labels = unlist(res$labels), coders = unlist(res$coders), py = res$py),
            class = "pg_agreement")
}
