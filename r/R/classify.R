# pg_classify(): P(label | text) for every label (Python's parallel_gen.classify).

# Columns every pg_classify() result has; a label named like one of them gets its
# probability column under "p_<label>" instead.
.CLASSIFY_COLUMNS <- c("text", "label", "error")

#' Classify texts over labels, with the probability of every label
#'
#' Scores each label as the continuation of the text's prompt (teacher-forced, no
#' sampling) and turns the labels' log-likelihoods into probabilities with a softmax, so
#' they are exact and the same on every run. All texts are scored together on the
#' model's batch; a text's prompt is decoded once for all its labels.
#'
#' @param model a model from [pg_model()], or the path of a `.gguf` file (opened and
#'   closed inside the call).
#' @param texts a character vector (or factor) of texts, any length. `NA` is an error
#'   naming its position.
#' @param labels a character vector of at least one label, each non-empty and given
#'   once. In plain mode a label is scored right after the prompt, so
#'   `"Label: "` + `"positive"` is scored as `"Label:"` then `" positive"` (whitespace
#'   ending the prompt moves to the label).
#' @param template `NULL` (a default prompt that names the labels and ends with
#'   `"Label: "`), a string in which `{text}` (required) is replaced by the text and
#'   `{labels}` by the labels joined by `", "`, or a function of one text returning the
#'   prompt (one string).
#' @param chat `TRUE`: put the formatted text in a user turn through the model's chat
#'   template and score each label as the assistant's whole answer (the label then the
#'   end-of-turn token, so a label that is the start of another, `"pos"` and
#'   `"positive"`, is not favoured).
#' @param system `NULL`, or a system message (needs `chat = TRUE`).
#' @param normalize `"sum"`: softmax over the labels' total log-likelihoods (the
#'   probability of the exact label string); `"mean"`: over their per-token means, which
#'   favours long labels less.
#' @param chat_template `NULL` (the model's own), Jinja template text, or a llama.cpp
#'   built-in name such as `"chatml"` (needs `chat = TRUE`), for a model without a
#'   template of its own.
#' @param progress show a progress bar (texts classified, on stderr) when the Python
#'   package tqdm is installed (a missing tqdm is said once per session).
#' @return A data.frame with one row per text, in text order:
#'   \describe{
#'     \item{text}{the text.}
#'     \item{label}{the most likely label (the first of equals); `NA` when `error` is set.}
#'     \item{one column per label, named by the label}{the label's probability; each row
#'       sums to 1. `out[["positive"]]` reads the column of the label `"positive"` (names
#'       are kept as they are, spaces and all). A label named `text`, `label` or `error`
#'       has its column named `p_text`, `p_label` or `p_error`.}
#'     \item{error}{why a text could not be classified (its prompt plus a label does not
#'       fit the model's `n_ctx`), with `NA` probabilities and label; else `NA`. Such a
#'       text does not stop the others.}
#'   }
#'   Bad arguments (no labels, an empty, duplicate or `NA` label, texts that are not
#'   character, `system` without `chat`) are R errors of class `pg_argument_error`
#'   naming the argument; a template without `{text}` is an error of class
#'   `pg_ValueError` (raised by Python).
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' out <- pg_classify(model, c("I loved this movie!", "Terrible food, rude staff."),
#'                    c("positive", "negative", "neutral"))
#' out[, c("label", "positive", "negative")]
#' pg_classify(model, reviews, c("positive", "negative"), chat = TRUE,
#'             system = "You label the sentiment of reviews.")
#' }
#' @export
pg_classify <- function(model, texts, labels, template = NULL, chat = FALSE, system = NULL,
                        normalize = c("sum", "mean"), chat_template = NULL, progress = interactive()) {
  model <- .check_model(model)
  texts <- .check_strings(texts, "texts")
  labels <- .check_labels(labels)
  prob_columns <- .prob_columns(labels)
  .check_flag(chat, "chat")
  .check_flag(progress, "progress")
  for (name in c("system", "chat_template")) {
    value <- get(name)
    if (is.null(value)) next
    .check_string(value, name)
    if (!chat) .arg_error(sprintf("`%s` needs `chat = TRUE` (a plain prompt has no chat turns)", name))
  }
  kwargs <- c(list(chat = chat, progress = .progress_bar(progress)), .prompt_kwargs(template, normalize),
              if (!is.null(system)) list(system = system),
              if (!is.null(chat_template)) list(chat_template = chat_template))
  result <- .py_call(.pg_attr("classify"), list(model, as.list(texts), as.list(labels)), kwargs)
  cols <- .helpers()$classifications(result)
  error <- .blank_na(cols$error)
  probs <- lapply(cols$probs, function(p) {
    p <- as.double(unlist(p))
    p[!is.na(error)] <- NA_real_  # Python's NaN for a failed text: missing in R
    p
  })
  names(probs) <- prob_columns
  out <- data.frame(text = texts, label = .blank_na(cols$label), stringsAsFactors = FALSE)
  out <- cbind(out, as.data.frame(probs, optional = TRUE), error = error, stringsAsFactors = FALSE)
  stopifnot(nrow(out) == length(texts))
  out
}

# Labels: at least one, none empty, none twice.
.check_labels <- function(labels) {
  labels <- .check_strings(labels, "labels")
  if (!length(labels)) .arg_error("`labels` is empty: give at least one label")
  empty <- which(!nzchar(labels))
  if (length(empty)) .arg_error(sprintf("labels[%d] is \"\": a label must have text to score", empty[[1L]]))
  dup <- anyDuplicated(labels)
  if (dup) {
    .arg_error(sprintf("labels[%d] (%s) repeats labels[%d]: give each label once", dup,
                       encodeString(labels[[dup]], quote = "\""), match(labels[[dup]], labels)))
  }
  labels
}

# `template` and `normalize` of pg_classify() and pg_classify_file(), checked, as Python
# keyword arguments (a NULL template left out: Python's default prompt).
.prompt_kwargs <- function(template, normalize) {
  if (!is.null(template) && !is.function(template)) .check_string(template, "template")
  c(list(normalize = .check_choice(normalize, c("sum", "mean"), "normalize")),
    if (!is.null(template)) list(template = template))
}

# A label's probability column is named by the label, unless that is a fixed column's name.
.prob_columns <- function(labels) {
  cols <- ifelse(labels %in% .CLASSIFY_COLUMNS, paste0("p_", labels), labels)
  dup <- anyDuplicated(cols)
  if (dup) {
    .arg_error(sprintf("`labels` has both %s and %s, whose probability columns would both be %s: rename one",
                       encodeString(labels[[match(cols[[dup]], cols)]], quote = "\""),
                       encodeString(labels[[dup]], quote = "\""), encodeString(cols[[dup]], quote = "\"")))
  }
  cols
}

# One of `choices`; the whole vector (a function's default, as match.arg() reads it) is the first.
.check_choice <- function(x, choices, name) {
  if (identical(x, choices)) return(choices[[1L]])
  if (!is.character(x) || length(x) != 1L || is.na(x) || !(x %in% choices)) {
    .arg_error(sprintf("`%s` must be one of %s, got %s", name,
                       paste(encodeString(choices, quote = "\""), collapse = ", "), .describe(x)))
  }
  x
}
