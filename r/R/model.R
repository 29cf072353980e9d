# pg_model(), pg_close() and the "pg_model" class: an R handle on a Python parallel_gen.Model.

#' Open a GGUF model for batched generation
#'
#' @param path path of a `.gguf` file. `NULL`: the default model of parallel_gen
#'   (SmolLM2-135M-Instruct, installed by `parallel-gen install-model`).
#' @param n_parallel prompts decoded at once (slots). More prompts than slots wait and
#'   join as slots free. `NULL`: the default of Python's `parallel_gen.ModelConfig`.
#' @param n_ctx tokens per sequence, prompt plus output. `NULL`: the model's training
#'   context, at most 4096.
#' @param repack whether llama.cpp repacks the weights for its faster CPU kernels (its
#'   extra buffer types). `NULL`: off when llama.cpp was built with AMX kernels (they
#'   crash on recent Intel Xeons), else on. `TRUE` turns it on with a fixed llama.cpp.
#' @param ... the other fields of Python's `parallel_gen.ModelConfig`: `n_batch`,
#'   `n_threads`, `n_gpu_layers`, `kv_unified`, `flash_attn`, `type_k`, `type_v`,
#'   `kv_size`, `share_prefix`, `prompt_cache` (`FALSE`: keep no finished prompt's KV
#'   for later prompts), `cache_ram` (MiB of host memory keeping prompt cache entries
#'   whose KV stream is needed for another prompt; 0: none), `batch_invariant` (`TRUE`: a prompt's output never depends on
#'   what else runs), `backend_sampling` (`TRUE`: sample inside llama.cpp's graph, so only
#'   token ids come back from a GPU; `NULL`: on when layers are offloaded), `verbose`; each
#'   left out keeps `ModelConfig`'s default.
#'   Whole doubles are accepted where an integer is needed.
#' @return A model of class `pg_model`. `model$n_ctx`, `model$n_parallel`,
#'   `model$closed`, ... read the settings of the Python `parallel_gen.Model` it wraps;
#'   printing it shows the main ones. It holds the weights and the KV cache until
#'   [pg_close()] or garbage collection.
#' @examples
#' \dontrun{
#' model <- pg_model(n_parallel = 16)
#' model
#' #> <pg_model> SmolLM2-135M-Instruct-Q4_1.gguf: n_parallel 16, n_ctx 4096, ...
#' }
#' @export
pg_model <- function(path = NULL, n_parallel = NULL, n_ctx = NULL, repack = NULL, ...) {
  kwargs <- .py_kwargs(c(list(n_parallel = n_parallel, n_ctx = n_ctx, repack = repack), list(...)))
  if (is.null(path)) {
    py <- .py_call(reticulate::py_get_attr(.pg_attr("Model"), "default"), list(), kwargs)
  } else {
    if (!is.character(path) || length(path) != 1L || is.na(path)) {
      .arg_error(sprintf("`path` must be a single file path or NULL, got %s", .describe(path)))
    }
    py <- .py_call(.pg_attr("Model"), list(path.expand(path)), kwargs)
  }
  .new_pg_model(py)
}

# The list holds the Python object; `$` is redirected to it, so reach the list's own
# element with .subset2().
.new_pg_model <- function(py) structure(list(py = py), class = "pg_model")

.py_model <- function(model) .subset2(model, "py")

#' Read a setting of a model
#'
#' `model$name` is the attribute `name` of the Python `parallel_gen.Model`, converted to
#' R: `n_parallel`, `n_ctx`, `n_batch`, `n_threads`, `kv_unified`, `flash_attn`,
#' `type_k`, `type_v`, `kv_size`, `n_gpu_layers`, `repack`, `path`, `closed`, `n_vocab`, ...
#' @param x a model from [pg_model()].
#' @param name the attribute's name.
#' @return The attribute's value, converted to R.
#' @export
`$.pg_model` <- function(x, name) {
  py <- .py_model(x)
  if (!reticulate::py_has_attr(py, name)) {
    .arg_error(sprintf("a pg_model has no setting `%s` (Python's parallel_gen.Model has no attribute %s)",
                       name, name))
  }
  reticulate::py_to_r(reticulate::py_get_attr(py, name))
}

#' @export
format.pg_model <- function(x, ...) {
  py <- .py_model(x)
  get <- function(name) reticulate::py_to_r(reticulate::py_get_attr(py, name))
  file <- basename(get("path"))
  if (get("closed")) return(sprintf("<pg_model> %s (closed)", file))
  fa <- get("flash_attn")
  sprintf(paste("<pg_model> %s: n_parallel %d, n_ctx %d, n_batch %d, %d thread(s), KV %s/%s%s, flash_attn %s,",
                "repack %s"),
          file, get("n_parallel"), get("n_ctx"), get("n_batch"), get("n_threads"), get("type_k"),
          get("type_v"), if (get("kv_unified")) " (unified)" else "",
          if (is.null(fa)) "auto" else if (fa) "on" else "off", if (get("repack")) "on" else "off")
}

#' @export
print.pg_model <- function(x, ...) {
  cat(format(x, ...), "\n", sep = "")
  invisible(x)
}

#' Free a model's memory now
#'
#' Optional: a model is also freed when R garbage-collects it. A closed model cannot
#' generate any more.
#' @param model a model from [pg_model()].
#' @return `NULL`, invisibly.
#' @export
pg_close <- function(model) {
  if (!inherits(model, "pg_model")) {
    .arg_error(sprintf("`model` must be a model from pg_model(), got %s", .describe(model)))
  }
  .py_call(reticulate::py_get_attr(.py_model(model), "close"))
  invisible(NULL)
}
