# R values -> the Python values parallel_gen expects, with R errors naming the argument.
# tests/testthat/test-arguments.R checks these lists against Python's
# dataclasses.fields(SamplingParams) and dataclasses.fields(ModelConfig), so they cannot
# drift apart.

# Arguments Python wants as int: whole doubles (5, 1e3) are accepted and converted.
.INT_ARGS <- c("n", "max_tokens", "top_k", "repeat_last_n", "seed", "logprobs",
               "n_parallel", "n_ctx", "n_batch", "n_threads", "n_gpu_layers", "kv_size",
               "cache_ram")
# Arguments Python wants as a list of int / a list of str (any length, length 1 included).
.INT_LIST_ARGS <- c("stop_token_ids")
.STR_LIST_ARGS <- c("stop", "choices", "grammar_triggers")
# Sampling options taken through `...` of pg_generate() and pg_chat() (the others are
# their named arguments); each is documented there.
.SAMPLING_DOTS <- c("n", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                    "frequency_penalty", "presence_penalty", "stop_token_ids", "ignore_eos",
                    "cache_prompt",
                    "grammar", "json_schema", "choices", "logprobs", "logit_bias", "grammar_triggers")
# ModelConfig fields taken through `...` of pg_model() (n_parallel and n_ctx are its
# named arguments); each is documented there.
.MODEL_DOTS <- c("n_batch", "n_threads", "n_gpu_layers", "kv_unified", "flash_attn", "type_k", "type_v",
                 "kv_size", "share_prefix", "prompt_cache", "cache_ram", "batch_invariant",
                 "backend_sampling", "verbose")

.is_whole <- function(x) is.numeric(x) & is.finite(x) & x == trunc(x)

# One whole number -> a Python int (exact up to 2^53, so seeds up to 2^32 work too).
.py_int <- function(x, name) {
  if (is.null(x)) return(NULL)
  if (!is.numeric(x) || length(x) != 1L || is.na(x) || !.is_whole(x)) {
    .arg_error(sprintf("`%s` must be a single whole number, got %s", name, .describe(x)))
  }
  if (is.integer(x)) return(x)
  reticulate::import_builtins(convert = FALSE)$int(as.double(x))
}

.py_int_list <- function(x, name) {
  if (is.null(x)) return(NULL)
  if (!is.numeric(x) || anyNA(x) || !all(.is_whole(x))) {
    .arg_error(sprintf("`%s` must be whole numbers without NA, got %s", name, .describe(x)))
  }
  lapply(unname(x), function(v) .py_int(v, name))
}

.py_str_list <- function(x, name) {
  if (is.null(x)) return(NULL)
  if (is.factor(x)) x <- as.character(x)
  if (!is.character(x)) .arg_error(sprintf("`%s` must be a character vector, got %s", name, .describe(x)))
  if (anyNA(x)) .arg_error(sprintf("`%s` must not contain NA (%s)", name, .na_positions(x, name)))
  as.list(unname(x))
}

# logit_bias: a named numeric vector, names the token ids, values the biases (-Inf bans
# a token), e.g. c("49000" = -Inf, "17" = 2) or setNames(c(-Inf, 2), c(49000, 17)) ->
# a Python dict {int: float}. Python checks the values' range.
.py_logit_bias <- function(x) {
  what <- "`logit_bias` must be a numeric vector named by token id, e.g. c(\"49000\" = -Inf)"
  if (!is.numeric(x) || !is.null(dim(x))) .arg_error(sprintf("%s, got %s", what, .describe(x)))
  if (!length(x)) return(NULL)
  ids <- names(x)
  if (is.null(ids)) .arg_error(sprintf("%s, got an unnamed %s", what, .describe(x)))
  bad <- which(is.na(ids) | !grepl("^[0-9]{1,9}$", ids))  # < 2^31: an R integer
  if (length(bad)) {
    .arg_error(sprintf("%s: names(logit_bias)[%d] is %s, not a token id (a whole number >= 0)",
                       what, bad[[1L]], encodeString(ids[[bad[[1L]]]], quote = "\"")))
  }
  if (anyDuplicated(ids)) {
    .arg_error(sprintf("`logit_bias` names token %s twice", ids[[anyDuplicated(ids)]]))
  }
  if (anyNA(x)) .arg_error(sprintf("`logit_bias` must not contain NA (%s)", .na_positions(x, "logit_bias")))
  reticulate::py_dict(as.list(as.integer(ids)), as.list(as.double(unname(x))), convert = FALSE)
}

# Any other argument: scalars pass as they are (NA rejected), longer vectors as lists,
# Python objects (e.g. a SamplingParams) untouched.
.py_value <- function(x, name) {
  if (is.null(x) || inherits(x, "python.builtin.object")) return(x)
  if (name == "logit_bias") return(.py_logit_bias(x))
  if (name %in% .INT_ARGS) return(.py_int(x, name))
  if (name %in% .INT_LIST_ARGS) return(.py_int_list(x, name))
  if (name %in% .STR_LIST_ARGS) return(.py_str_list(x, name))
  if (is.factor(x)) x <- as.character(x)
  if (is.atomic(x)) {
    if (anyNA(x)) .arg_error(sprintf("`%s` must not be NA", name))
    if (length(x) == 1L) return(unname(x))
    return(as.list(unname(x)))
  }
  x
}

# Named R arguments -> a named list of Python-ready values (NULLs left out: Python's default).
.py_kwargs <- function(args) {
  nms <- names(args)
  if (length(args) && (is.null(nms) || any(!nzchar(nms)))) {
    .arg_error("every argument in `...` must be named (e.g. top_k = 20)")
  }
  out <- list()
  for (name in nms) {
    v <- .py_value(args[[name]], name)
    if (!is.null(v)) out[name] <- list(v)
  }
  out
}

.check_flag <- function(x, name) {
  if (!is.logical(x) || length(x) != 1L || is.na(x)) {
    .arg_error(sprintf("`%s` must be TRUE or FALSE, got %s", name, .describe(x)))
  }
  x
}

.describe <- function(x) {
  if (is.null(x)) return("NULL")
  if (inherits(x, "python.builtin.object")) return(sprintf("a Python %s", class(x)[[1L]]))
  s <- paste(utils::head(format(x), 3L), collapse = ", ")
  if (length(x) > 3L) s <- paste0(s, ", ...")
  sprintf("%s of length %d (%s)", class(x)[[1L]], length(x), s)
}

# "prompts[2], prompts[5]" for the NA entries (at most 5 named).
.na_positions <- function(x, name) {
  where <- which(is.na(x))
  s <- paste(sprintf("%s[%d]", name, utils::head(where, 5L)), collapse = ", ")
  if (length(where) > 5L) s <- sprintf("%s and %d more", s, length(where) - 5L)
  s
}

# Prompts, texts, labels: a character vector (or factor) of any length, no NA; `name` is
# the argument's name in error messages.
.check_strings <- function(x, name) {
  if (is.factor(x)) x <- as.character(x)
  if (!is.character(x) || !is.null(dim(x))) {
    .arg_error(sprintf("`%s` must be a character vector, got %s", name, .describe(x)))
  }
  if (anyNA(x)) {
    n <- sum(is.na(x))
    .arg_error(sprintf("%s %s NA: every element of `%s` must be a string (drop or replace missing values first)",
                       .na_positions(x, name), if (n == 1L) "is" else "are", name))
  }
  as.vector(unname(x))
}

# A model from pg_model() (-> its Python Model), or the path of a .gguf file.
.check_model <- function(model) {
  if (inherits(model, "pg_model")) return(.py_model(model))
  if (is.character(model) && length(model) == 1L && !is.na(model)) return(path.expand(model))
  .arg_error(sprintf("`model` must be a model from pg_model() or the path of a .gguf file, got %s",
                     .describe(model)))
}
