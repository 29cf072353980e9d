# pg_classify_file(): a file of texts in, a file of label probabilities out (Python's
# parallel_gen.jobs.classify_file), streamed and resumable like pg_generate_file().

#' Classify every text of a file, writing each row's label probabilities as soon as it is done
#'
#' The file counterpart of [pg_classify()], and the job `parallel-gen classify -f input -o
#' output` runs: rows are read lazily, scored together with bounded look-ahead, and each
#' output row is written (and flushed) as soon as it and every row before it are done, in
#' input order, as [pg_generate_file()] does. A row's probabilities are those
#' [pg_classify()] gives its text. A stopped job is continued with `resume = TRUE`: rows
#' already written are skipped (scoring is exact, so the result equals an uninterrupted
#' run).
#'
#' @inheritParams pg_generate_file
#' @inheritParams pg_classify
#' @param input the input file: text (one text per line), JSONL (a `text_column` field
#'   per line), CSV or Parquet (Parquet needs the Python package pyarrow). `"-"` reads
#'   stdin.
#' @param output the output file: JSONL, CSV or Parquet (by its extension, or
#'   `output_format`). Each output row holds the input row's fields, then `row` (the
#'   input row number, from 0), `label` (the most likely label), one probability column
#'   per label, **named `p_<label>`** (`p_positive`, ..., in the order of `labels`;
#'   unlike [pg_classify()]'s data.frame, whose columns are named by the label),
#'   `error` and `error_code` (its ErrorCode value). An input field named like one of these
#'   is carried as `input_<name>`. A row
#'   that cannot be classified (no text, a text too long for `n_ctx`) has `error` set
#'   and an empty label and probabilities; the job goes on.
#' @param text_column the input field holding the text (a text file's lines are the
#'   texts).
#' @param chat `TRUE`: score each label as the assistant's answer through the model's
#'   chat template (see [pg_classify()]). `system` and `chat_template` imply it.
#' @param system `NULL`, or a system message for every text (implies `chat`).
#' @param chat_template `NULL` (the model's own), Jinja template text, or a llama.cpp
#'   built-in name such as `"chatml"` (implies `chat`).
#' @param input_format,output_format `"auto"` (by the file's extension; an input without
#'   one whose first line is a JSON object with the `text_column` field is JSONL, else
#'   text), or `"text"`, `"jsonl"`, `"csv"`, `"parquet"`.
#' @param progress show a progress bar (texts classified, on stderr) when the Python
#'   package tqdm is installed.
#' @return A one-row data.frame, the job's summary, as [pg_generate_file()]'s: `output`,
#'   `rows`, `written`, `skipped` (already there, with `resume`), `failed` (rows written
#'   with an error), `prompt_tokens` (the texts' prompts), `completion_tokens` (0: nothing
#'   is generated), `seconds`, `tokens_per_second`, `rows_per_second`, `n_ctx` and `interrupted`. Bad
#'   arguments (labels as for [pg_classify()]) are R errors of class `pg_argument_error`,
#'   and an existing output without `resume` or `overwrite`, or one written with other
#'   labels, an error of class `pg_JobInputError`, all before any row is written.
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' write.csv(data.frame(id = 1:2, review = c("I loved this movie!", "Terrible food, rude staff.")),
#'           "reviews.csv", row.names = FALSE)
#' pg_classify_file(model, "reviews.csv", "labels.csv", c("positive", "negative", "neutral"),
#'                  text_column = "review")
#' read.csv("labels.csv")  # id, review, row, label, p_positive, p_negative, p_neutral, error
#' # after an interruption: the same call with resume = TRUE finishes the job
#' }
#' @export
pg_classify_file <- function(model, input, output, labels, text_column = "text", template = NULL, chat = FALSE,
                             system = NULL, normalize = c("sum", "mean"), chat_template = NULL,
                             input_format = "auto", output_format = "auto", resume = FALSE, overwrite = FALSE,
                             model_options = NULL, progress = interactive()) {
  model <- .check_model(model)
  labels <- .check_labels(labels)
  job <- .file_job_args(input, output, input_format, output_format, list(text_column = text_column),
                        resume, overwrite, chat, system, chat_template, model_options, progress)
  .run_file_job("classify_file", model, job$paths, list(as.list(labels)),
                c(job$kwargs, .prompt_kwargs(template, normalize)))
}
