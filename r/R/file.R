# pg_generate_file(): a file of prompts in, a file of rows out (Python's
# parallel_gen.jobs.run_file_job), streamed and resumable.

#' Generate for every row of a file, writing each result as soon as it is done
#'
#' Runs the same job as `parallel-gen generate -f input -o output`: rows are read lazily,
#' generated together with bounded look-ahead, and each output row is written (and
#' flushed) as soon as it and every row before it are done, in input order. Memory stays
#' flat in the number of rows. A job that was stopped (Ctrl-C, a crash, a killed R) is
#' continued with `resume = TRUE`: rows already written are skipped, and with a `seed`
#' (or `temperature = 0`) the result equals an uninterrupted run.
#'
#' @inheritParams pg_generate
#' @param model a model from [pg_model()], or the path of a `.gguf` file (opened for the
#'   job with `model_options` and, unless they give `n_ctx`, a context sized to the
#'   prompts).
#' @param input the input file: text (one prompt per line), JSONL (a `prompt` or
#'   `messages` field per line), CSV or Parquet (Parquet needs the Python package
#'   pyarrow). `"-"` reads stdin.
#' @param output the output file: JSONL, CSV or Parquet (by its extension, or
#'   `output_format`). Every input field is carried into its output row, followed by
#'   `row` (the input row number, from 0), `text`, `finish_reason`, `stop_reason`,
#'   `prompt_tokens`, `completion_tokens`, `error` and `error_code` (a bad row, e.g. a
#'   missing prompt, becomes a row with `error` set and its code, such as
#'   `invalid_input`, in `error_code`; the job goes on).
#' @param ... the other sampling options of [pg_generate()]. A row's own columns named
#'   like a sampling option (`max_tokens`, `seed`, `json_schema`, ...) override these
#'   for that row. Row *r* samples with `seed + r` unless it gives its own seed.
#' @param input_format,output_format `"auto"` (by the file's extension; an input
#'   without one whose first line is a JSON object with the prompt or messages field is
#'   JSONL, else text), or `"text"`, `"jsonl"`, `"csv"`, `"parquet"`.
#' @param prompt_column,messages_column the input fields holding the prompt, or the
#'   conversation (a list of `{"role", "content"}` messages).
#' @param resume continue a job whose output exists.
#' @param overwrite replace an existing output. Without `resume` or `overwrite`, an
#'   existing output is an error (class `pg_JobInputError`) and is left untouched.
#' @param chat send plain prompts through the model's chat template, as a user message.
#' @param system `NULL`, or a system message for every prompt (implies `chat`).
#' @param chat_template `NULL` (the model's own), Jinja template text, or a llama.cpp
#'   built-in name such as `"chatml"` (implies `chat`).
#' @param model_options `NULL`, or a named list of [pg_model()] settings (`n_parallel`,
#'   `n_ctx`, `n_threads`, ...) used when `model` is a path.
#' @param cache `NULL` (no result cache), a directory, or a Redis URL
#'   (`"redis://host:6379/0"`): rows whose result is a function of their inputs
#'   (`temperature = 0`, or a `seed` given to the job or by the row) are answered from it
#'   without decoding, and the rows decoded whole are stored (as [pg_generate()]'s `cache`).
#' @return A one-row data.frame, the job's summary: `output`, `rows` (rows in the output
#'   now), `written` (by this call), `skipped` (already there, with `resume`), `failed`
#'   (rows written with an error), `prompt_tokens`, `completion_tokens`, `seconds`,
#'   `tokens_per_second`, `rows_per_second`, `n_ctx` and `interrupted`.
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' write.csv(data.frame(id = 1:3, prompt = c("Hi", "Hello", "Hey")), "in.csv", row.names = FALSE)
#' pg_generate_file(model, "in.csv", "out.csv", max_tokens = 16, temperature = 0)
#' read.csv("out.csv")
#' # after an interruption: the same call with resume = TRUE finishes the job
#' }
#' @export
pg_generate_file <- function(model, input, output, max_tokens = 128L, temperature = 0.8, ..., seed = NULL,
                             stop = NULL, input_format = "auto", output_format = "auto", prompt_column = "prompt",
                             messages_column = "messages", resume = FALSE, overwrite = FALSE, chat = FALSE,
                             system = NULL, chat_template = NULL, model_options = NULL,
                             progress = interactive(), cache = NULL) {
  model <- .check_model(model)
  job <- .file_job_args(input, output, input_format, output_format,
                        list(prompt_column = prompt_column, messages_column = messages_column),
                        resume, overwrite, chat, system, chat_template, model_options, progress)
  kwargs <- c(.sampling_kwargs(max_tokens, temperature, seed, stop, list(...)), job$kwargs)
  if (!is.null(cache)) kwargs$cache <- .check_string(cache, "cache")
  .run_file_job("run_file_job", model, job$paths, kwargs = kwargs)
}

# The arguments every file job (pg_generate_file(), pg_classify_file()) takes, checked:
# list(paths = its input and output, paths expanded ("-" is stdin / stdout), kwargs = the
# Python keyword arguments, NULLs left out so Python's defaults apply). `columns`: the
# job's input-column arguments, by name.
.file_job_args <- function(input, output, input_format, output_format, columns, resume, overwrite, chat,
                           system, chat_template, model_options, progress) {
  strings <- c(list(input = input, output = output, input_format = input_format, output_format = output_format),
               columns)
  for (name in names(strings)) .check_string(strings[[name]], name)
  optional <- list(system = system, chat_template = chat_template)
  for (name in names(optional)) if (!is.null(optional[[name]])) .check_string(optional[[name]], name)
  flags <- list(resume = resume, overwrite = overwrite, chat = chat, progress = progress)
  for (name in names(flags)) .check_flag(flags[[name]], name)
  if (!is.null(model_options) && (!is.list(model_options) || is.data.frame(model_options))) {
    .arg_error(sprintf("`model_options` must be NULL or a named list, got %s", .describe(model_options)))
  }
  path <- function(p) if (identical(p, "-")) p else path.expand(p)
  list(paths = list(path(input), path(output)),
       kwargs = c(list(input_format = input_format, output_format = output_format), columns,
                  list(resume = resume, overwrite = overwrite, chat = chat, progress = .progress_bar(progress)),
                  optional[!vapply(optional, is.null, logical(1))],
                  if (!is.null(model_options)) list(model_options = .py_kwargs(model_options))))
}

# Runs parallel_gen.jobs.<job>(model, input, output, *args, **kwargs); its JobSummary as
# a one-row data.frame (a None field is NA).
.run_file_job <- function(job, model, paths, args = list(), kwargs = list()) {
  jobs <- .import_or_explain("parallel_gen.jobs")
  summary <- .py_call(reticulate::py_get_attr(jobs, job), c(list(model), paths, args), kwargs)
  row <- .helpers()$job_summary(summary)
  as.data.frame(lapply(row, function(v) if (is.null(v)) NA else v), stringsAsFactors = FALSE)
}

.check_string <- function(x, name) {
  if (!is.character(x) || length(x) != 1L || is.na(x) || !nzchar(x)) {
    .arg_error(sprintf("`%s` must be one non-empty string, got %s", name, .describe(x)))
  }
  x
}
