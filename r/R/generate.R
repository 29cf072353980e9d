# pg_generate(), pg_chat(), pg_stats().

#' Generate a completion for every prompt, all decoded together
#'
#' @param model a model from [pg_model()], or the path of a `.gguf` file (opened and
#'   closed inside the call).
#' @param prompts a character vector, any length (one string included). `NA` is an error
#'   naming its position. The text is sent as is: for an instruction model, format it
#'   with the model's chat template, or use [pg_chat()].
#' @param max_tokens most tokens to generate per prompt.
#' @param temperature `0` is greedy (always the most likely token).
#' @param ... other sampling options of parallel_gen (the fields of Python's
#'   `SamplingParams`): `n` (samples per prompt), `top_k`, `top_p`, `min_p`,
#'   `repeat_penalty`, `repeat_last_n`, `frequency_penalty`, `presence_penalty`,
#'   `stop_token_ids` (token ids that end a completion), `ignore_eos`, one of `grammar`
#'   (GBNF text), `json_schema` (JSON text) and `choices` (a character vector: the
#'   output is one of them), `grammar_triggers` (regular expressions: the grammar
#'   applies only from the first match on), `logprobs` (`0` to `20`: adds the
#'   `logprobs` column), `logit_bias` (a numeric vector named by token id, added to
#'   those tokens' logits: `c("49000" = -Inf)` bans token 49000) and `cache_prompt`
#'   (`FALSE`: decode the prompt whole and keep none of its KV in the model's prompt
#'   cache). An unknown name is an error listing the valid ones.
#' @param seed `NULL` (fresh randomness on every call) or a whole number in
#'   `[0, 2^32)`: prompt *i* then uses seed + *i* - 1, so a call with the same seed repeats
#'   exactly. The seed is used as given: [set.seed()] has no effect on it, and
#'   generation does not touch R's random number stream.
#' @param stop `NULL` or a character vector of strings that end a completion (the stop
#'   string is not included in the text).
#' @param progress show a progress bar (on stderr) while generating, when the Python
#'   package tqdm is installed (a missing tqdm is said once per session).
#' @param cache `NULL` (no result cache), a directory, or a Redis URL
#'   (`"redis://host:6379/0"`, shared by every process using it): deterministic prompts
#'   (greedy, or with a `seed`) answered before are answered from it without decoding
#'   (`pg_stats()$cache_hits` counts them).
#' @return A data.frame with one row per prompt, in prompt order:
#'   \describe{
#'     \item{prompt}{the prompt.}
#'     \item{text}{the generated text.}
#'     \item{finish_reason}{`"stop"` (end of generation or a stop string), `"length"`
#'       (`max_tokens` or the context is full) or `"error"`.}
#'     \item{stop_reason}{what ended a `"stop"`: the stop string, or the id (as text) of
#'       the token that ended it (one of `stop_token_ids`, or the model's
#'       end-of-generation token); `NA` otherwise.}
#'     \item{prompt_tokens, completion_tokens}{integer token counts.}
#'     \item{error}{why a prompt failed (an empty prompt, one longer than the context),
#'       else `NA`. Such a prompt does not stop the others.}
#'     \item{logprobs}{only when `logprobs` is given: a list column, one data.frame per
#'       row with one row per (generated token, rank): `position` (1, 2, ... in the
#'       output), `rank` (`0`: the generated token; `1` to `logprobs`: the most likely
#'       tokens at that position, best first), `token_id`, `token` (its text) and
#'       `logprob` (natural log-probability under the model's raw distribution, before
#'       penalties, bias, grammar and temperature).}
#'   }
#'   With `n = k` (k samples per prompt) there is one row per sample instead, prompt by
#'   prompt, with two more integer columns first: `index` (the prompt's position) and
#'   `sample` (1 to k).
#'   The call's statistics are in `attr(result, "stats")`; see [pg_stats()].
#'   Bad arguments are R errors of class `pg_argument_error`; an exception raised by
#'   Python is an R error of class `pg_<PythonClass>` (e.g. `pg_ValueError`), then
#'   `pg_python_error` and `pg_error`, with the Python message as its message.
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' out <- pg_generate(model, c("The capital of France is", "2 + 2 ="),
#'                    max_tokens = 16, temperature = 0, seed = 1)
#' out$text
#' }
#' @export
pg_generate <- function(model, prompts, max_tokens = 128L, temperature = 0.8, ...,
                        seed = NULL, stop = NULL, progress = interactive(), cache = NULL) {
  model <- .check_model(model)
  prompts <- .check_strings(prompts, "prompts")
  .check_flag(progress, "progress")
  kwargs <- .sampling_kwargs(max_tokens, temperature, seed, stop, list(...))
  if (!is.null(cache)) kwargs$cache <- .check_string(cache, "cache")
  .run("generate_parallel", model, as.list(prompts), kwargs, progress, prompts)
}

#' Answer every conversation with the model's chat template, all decoded together
#'
#' @inheritParams pg_generate
#' @param model a model from [pg_model()] (or the path of a `.gguf` file).
#' @param conversations the conversations, each one of:
#'   a string (one user message); a data.frame with columns `role` and `content` (one
#'   row per message); or a list of messages, each `list(role = , content = )` (or a
#'   named character vector `c(role = , content = )`).
#'   Give them as a list, or as a character vector (one user message each, any length).
#'   A single data.frame is one conversation. `NA` is an error naming its position.
#' @param ... the sampling options of [pg_generate()], and `chat_template` (Jinja
#'   template text, or a llama.cpp built-in name such as `"chatml"`, for a model without
#'   a template of its own).
#' @param system `NULL`, or a system message put first in every conversation that does
#'   not begin with one (handy for annotation: the instructions once, the texts as a
#'   character vector).
#' @param tools `NULL`, or the functions the model may call, OpenAI-style: JSON text
#'   (`'[{"type": "function", "function": {"name": ..., "description": ...,
#'   "parameters": {...}}}]'`) or the same as R lists (write JSON arrays, such as a
#'   schema's `required`, as `list()`: a length-one character vector becomes a string).
#'   They are offered in every conversation, in the model's own tool-call format.
#' @param tool_choice `NULL` (`"auto"` with tools: the model answers or calls a tool),
#'   `"required"` (the reply is tool calls, by grammar), `"none"`, or a tool's name (a
#'   call of that tool, by grammar).
#' @param parallel_tool_calls allow several calls in one reply.
#' @return A data.frame as from [pg_generate()]; `prompt` is the formatted prompt the
#'   chat template produced. With `tools`, `finish_reason` is `"tool_calls"` for a
#'   reply that calls tools, and two more columns follow: `content` (the reply's text
#'   besides its calls; `NA` for a failed conversation) and `tool_calls`, a list
#'   column: per row a data.frame with one row per call, columns `id` (unique),
#'   `name` and `arguments` (JSON text matching the tool's parameters schema); zero
#'   rows when the reply has no calls.
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' pg_chat(model, c("I loved this film!", "Worst purchase ever."), temperature = 0,
#'         system = "Answer with one word: positive or negative.")$text
#' weather <- '[{"type": "function", "function": {"name": "get_weather",
#'   "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
#'                  "required": ["city"]}}}]'
#' out <- pg_chat(model, c("Weather in Paris?", "Weather in Rome?"), tools = weather,
#'                tool_choice = "required", temperature = 0)
#' out$tool_calls[[1]]$arguments
#' }
#' @export
pg_chat <- function(model, conversations, max_tokens = 128L, temperature = 0.8, ...,
                    seed = NULL, stop = NULL, system = NULL, progress = interactive(),
                    tools = NULL, tool_choice = NULL, parallel_tool_calls = TRUE) {
  model <- .check_model(model)
  convs <- .check_conversations(conversations, system)
  .check_flag(progress, "progress")
  .check_flag(parallel_tool_calls, "parallel_tool_calls")
  kwargs <- .sampling_kwargs(max_tokens, temperature, seed, stop, list(...))
  if (!is.null(tools)) {
    kwargs$tools <- .py_tools(tools)
    kwargs$parallel_tool_calls <- parallel_tool_calls
  }
  if (!is.null(tool_choice)) kwargs$tool_choice <- .py_tool_choice(tool_choice)
  .run("chat_parallel", model, convs, kwargs, progress, NULL)
}

# Tools as JSON text (parsed by Python's json) or as R lists (converted by reticulate).
.py_tools <- function(tools) {
  if (is.character(tools)) {
    if (length(tools) != 1L || is.na(tools)) {
      .arg_error(sprintf("`tools` must be one string of JSON or a list, got %s", .describe(tools)))
    }
    json <- reticulate::import("json", convert = FALSE)  # Python values as they are: [x] stays a list
    return(tryCatch(json$loads(tools), error = function(e) {
      .arg_error(sprintf("`tools` is not valid JSON: %s", conditionMessage(e)))
    }))
  }
  if (!is.list(tools)) .arg_error(sprintf("`tools` must be JSON text or a list, got %s", .describe(tools)))
  tools
}

# "auto", "required", "none", or a tool's name -> OpenAI's tool_choice.
.py_tool_choice <- function(choice) {
  if (!is.character(choice) || length(choice) != 1L || is.na(choice)) {
    .arg_error(sprintf("`tool_choice` must be one string (auto, required, none or a tool's name), got %s",
                       .describe(choice)))
  }
  if (choice %in% c("auto", "required", "none")) return(choice)
  list(type = "function", "function" = list(name = choice))
}

# The named sampling arguments plus `...` -> Python keyword arguments.
.sampling_kwargs <- function(max_tokens, temperature, seed, stop, dots) {
  .py_kwargs(c(list(max_tokens = max_tokens, temperature = temperature, seed = seed, stop = stop), dots))
}

#' Statistics of a generation call
#'
#' @param x `NULL`: the last [pg_generate()] or [pg_chat()] call of this session; or a
#'   data.frame they returned.
#' @return A one-row data.frame (so that several can be `rbind()`-ed), the fields of
#'   Python's `BatchStats`: `prompts`, `prompt_tokens`, `completion_tokens`,
#'   `prompt_seconds`, `generation_seconds`, `wall_seconds`,
#'   `prompt_tokens_per_second`, `generation_tokens_per_second`, `decode_calls`,
#'   `decode_retries`, `fallback_decodes`, `failed`, `preemptions`, `sequence_moves`,
#'   `prefix_tokens_reused`, `cache_hits`, `cached_prompt_tokens` (prompt tokens whose
#'   KV came from the model's prompt cache), `prompt_cache_hits`, `prompt_cache_misses`,
#'   `prompt_cache_evictions`, `host_cache_hits` and `host_cached_tokens` (the part of the
#'   hits and tokens restored from host memory, `cache_ram`), `host_cache_saves`,
#'   `host_cache_evictions`, `host_seconds` (engine time outside llama.cpp's decode calls:
#'   admission, sampling, stop checks), `backend_sampled_tokens` (tokens sampled in
#'   llama.cpp's graph, `backend_sampling`).
#' @export
pg_stats <- function(x = NULL) {
  if (is.null(x)) {
    if (is.null(.pg_state$last_stats)) {
      .arg_error("no pg_generate() or pg_chat() call has finished in this session yet")
    }
    return(.pg_state$last_stats)
  }
  s <- attr(x, "stats", exact = TRUE)
  if (!is.data.frame(x) || is.null(s)) {
    .arg_error("`x` must be a data.frame returned by pg_generate() or pg_chat()")
  }
  s
}

# Runs pg.<fun>(model, inputs, **kwargs) and builds the data.frame.
.run <- function(fun, model, inputs, kwargs, progress, prompts) {
  kwargs$progress <- .progress_bar(progress)
  result <- .py_call(.pg_attr(fun), list(model, inputs), kwargs)
  helpers <- .helpers()
  cols <- helpers$columns(result)
  chr <- function(v) as.character(unlist(v))
  int <- function(v) as.integer(unlist(v))
  index <- int(cols$index) + 1L
  sample <- int(cols$sample) + 1L
  out <- data.frame(
    prompt = if (is.null(prompts)) chr(cols$prompt) else prompts[index],
    text = chr(cols$text),
    finish_reason = chr(cols$finish_reason),
    stop_reason = .blank_na(cols$stop_reason),
    prompt_tokens = int(cols$prompt_tokens),
    completion_tokens = int(cols$completion_tokens),
    error = .blank_na(cols$error),
    stringsAsFactors = FALSE
  )
  if (!is.null(kwargs$logprobs)) out$logprobs <- lapply(helpers$logprobs(result), .logprob_frame)
  if (!is.null(kwargs$tools)) {
    calls <- helpers$tool_calls(result)
    out$content <- vapply(calls, function(x) as.character(x$content), "")
    out$content[out$finish_reason == "error"] <- NA_character_
    out$tool_calls <- lapply(calls, function(x) {
      data.frame(id = as.character(unlist(x$id)), name = as.character(unlist(x$name)),
                 arguments = as.character(unlist(x$arguments)), stringsAsFactors = FALSE)
    })
  }
  if (any(sample > 1L)) {
    # n > 1 samples per prompt: one row per sample, `index` and `sample` say which.
    out <- cbind(data.frame(index = index, sample = sample), out)
  } else {
    stopifnot(identical(index, seq_len(nrow(out))))
  }
  stats <- as.data.frame(lapply(helpers$stats(result), function(v) if (is.null(v)) NA else v),
                         stringsAsFactors = FALSE)
  attr(out, "stats") <- stats
  .pg_state$last_stats <- stats
  out
}

# A column of strings from Python in which "" stands for None (a stop string, an error or
# a label is never "") -> a character vector with NA there.
.blank_na <- function(v) {
  v <- as.character(unlist(v))
  v[!nzchar(v)] <- NA_character_
  v
}

# One output's log-probabilities (flat columns from parallelgen_r.logprobs) -> a data.frame.
.logprob_frame <- function(cols) {
  data.frame(position = as.integer(unlist(cols$position)) + 1L, rank = as.integer(unlist(cols$rank)),
             token_id = as.integer(unlist(cols$token_id)), token = as.character(unlist(cols$token)),
             logprob = as.double(unlist(cols$logprob)), stringsAsFactors = FALSE)
}

# parallel_gen draws its bar with tqdm and raises ImportError on progress=True without it:
# from R (progress = interactive() by default) a missing tqdm only means no bar, said once.
.progress_bar <- function(progress) {
  if (!progress) return(FALSE)
  if (is.null(.pg_state$has_tqdm)) .pg_state$has_tqdm <- reticulate::py_module_available("tqdm")
  if (!.pg_state$has_tqdm && !isTRUE(.pg_state$told_tqdm)) {
    .pg_state$told_tqdm <- TRUE
    message("parallelgen: no progress bar: the Python package tqdm is not installed in ",
            reticulate::py_config()$python, " (pip install tqdm)")
  }
  .pg_state$has_tqdm
}

# Conversations -> a list of lists of list(role=, content=) (Python: list of list of dict).
.check_conversations <- function(conversations, system = NULL) {
  if (!is.null(system) && (!is.character(system) || length(system) != 1L || is.na(system))) {
    .arg_error(sprintf("`system` must be NULL or one string, got %s", .describe(system)))
  }
  if (is.factor(conversations)) conversations <- as.character(conversations)
  if (is.data.frame(conversations)) conversations <- list(conversations)
  if (is.character(conversations)) {
    if (anyNA(conversations)) {
      .arg_error(sprintf("%s: NA where a message was expected", .na_positions(conversations, "conversations")))
    }
    conversations <- as.list(unname(conversations))
  }
  if (!is.list(conversations)) {
    .arg_error(sprintf("`conversations` must be a list or a character vector, got %s", .describe(conversations)))
  }
  if (length(conversations) && .is_message(conversations)) {
    .arg_error(paste0("`conversations` is a single message: give a list of conversations, e.g. ",
                      "list(list(list(role = \"user\", content = \"...\")))"))
  }
  lapply(seq_along(conversations), function(i) {
    conv <- .one_conversation(conversations[[i]], sprintf("conversations[[%d]]", i))
    if (!is.null(system) && (!length(conv) || !identical(conv[[1L]]$role, "system"))) {
      conv <- c(list(list(role = "system", content = system)), conv)
    }
    conv
  })
}

.is_message <- function(x) !is.null(names(x)) && all(c("role", "content") %in% names(x))

.one_conversation <- function(conv, where) {
  if (is.factor(conv)) conv <- as.character(conv)
  if (is.character(conv) && length(conv) == 1L && is.null(names(conv))) {
    if (is.na(conv)) .arg_error(sprintf("%s is NA", where))
    return(list(list(role = "user", content = conv)))
  }
  if (is.data.frame(conv)) {
    if (!all(c("role", "content") %in% names(conv))) {
      .arg_error(sprintf("%s: a data.frame conversation needs columns `role` and `content`", where))
    }
    conv <- lapply(seq_len(nrow(conv)), function(j) {
      list(role = as.character(conv$role[[j]]), content = as.character(conv$content[[j]]))
    })
  } else if (.is_message(conv)) {
    .arg_error(sprintf("%s is a single message: wrap it in list() to make it a conversation", where))
  } else if (!is.list(conv)) {
    .arg_error(sprintf("%s must be a string, a data.frame or a list of messages, got %s", where, .describe(conv)))
  }
  lapply(seq_along(conv), function(j) .one_message(conv[[j]], sprintf("%s[[%d]]", where, j)))
}

.one_message <- function(msg, where) {
  if (!(is.list(msg) || is.character(msg)) || !.is_message(msg)) {
    .arg_error(sprintf("%s must be a message: list(role = , content = ), got %s", where, .describe(msg)))
  }
  msg <- as.list(msg)
  out <- list()
  for (key in names(msg)) {
    v <- msg[[key]]
    if (is.factor(v)) v <- as.character(v)
    if (!is.character(v) || length(v) != 1L) {
      .arg_error(sprintf("%s$%s must be one string, got %s", where, key, .describe(v)))
    }
    if (is.na(v)) .arg_error(sprintf("%s$%s is NA", where, key))
    out[[key]] <- v
  }
  out
}
