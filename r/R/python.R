# Finding Python, importing parallel_gen, and turning Python exceptions into R conditions.

.pg_state <- new.env(parent = emptyenv())

#' Point reticulate at a Python environment with parallel_gen installed
#'
#' Call it once per R session, before anything else uses Python: reticulate binds an R
#' session to one Python for good. With no arguments it keeps reticulate's own choice
#' (the `RETICULATE_PYTHON` environment variable, else the first Python it finds) and
#' only checks that `parallel_gen` can be imported there.
#'
#' Setting up a virtual environment once, from a shell:
#' ```
#' python3 -m venv ~/.venvs/parallel_gen
#' ~/.venvs/parallel_gen/bin/pip install /path/to/parallel_gen   # the Python package
#' ~/.venvs/parallel_gen/bin/parallel-gen install-model         # a small model
#' ```
#' then in R: `pg_use_python(virtualenv = "~/.venvs/parallel_gen")`, which is
#' `reticulate::use_virtualenv("~/.venvs/parallel_gen", required = TRUE)` plus the
#' check. Setting `RETICULATE_PYTHON=~/.venvs/parallel_gen/bin/python` (in `~/.Renviron`)
#' does the same for every session.
#'
#' @param virtualenv path (or name, see [reticulate::use_virtualenv()]) of a virtual
#'   environment.
#' @param python path of a Python executable (see [reticulate::use_python()]).
#' @return Invisibly, a list: `python` (the executable in use), `version` (of
#'   parallel_gen). An error of class `pg_python_missing` says how to install
#'   parallel_gen when it cannot be imported.
#' @export
pg_use_python <- function(virtualenv = NULL, python = NULL) {
  if (!is.null(virtualenv) && !is.null(python)) {
    .arg_error("give `virtualenv` or `python`, not both")
  }
  wanted <- if (!is.null(virtualenv)) virtualenv else python
  if (!is.null(wanted) && (!is.character(wanted) || length(wanted) != 1L || is.na(wanted))) {
    .arg_error("`virtualenv` / `python` must be a single path")
  }
  if (!is.null(wanted) && reticulate::py_available(initialize = FALSE)) {
    current <- reticulate::py_config()$python
    exe <- if (!is.null(virtualenv)) {
      tryCatch(reticulate::virtualenv_python(virtualenv), error = function(e) virtualenv)
    } else python
    if (!identical(.bin_dir(exe), .bin_dir(current))) {
      .arg_error(sprintf(paste0(
        "this R session already uses the Python %s (reticulate binds one Python per session); ",
        "restart R and call pg_use_python() before anything else uses Python, or set ",
        "RETICULATE_PYTHON before starting R"), current))
    }
    wanted <- NULL  # already in use
  }
  if (!is.null(wanted)) tryCatch({
    if (!is.null(virtualenv)) reticulate::use_virtualenv(virtualenv, required = TRUE)
    if (!is.null(python)) reticulate::use_python(python, required = TRUE)
  }, error = function(e) {
    .stop(c("pg_python_missing", "pg_error"),
          sprintf("cannot use the Python environment %s: %s\n%s", wanted, conditionMessage(e),
                  .install_hint()))
  })
  pg <- .pg()
  invisible(list(python = reticulate::py_config()$python,
                 version = reticulate::py_to_r(reticulate::py_get_attr(pg, "__version__"))))
}

#' Is parallel_gen available?
#'
#' @return `TRUE` when the Python package parallel_gen can be imported from the Python
#'   that reticulate uses (initializing reticulate if needed), else `FALSE`.
#' @export
pg_available <- function() {
  tryCatch({
    .pg()
    TRUE
  }, error = function(e) FALSE)
}

# The directory of a Python executable, symlinks in the file name itself not followed (a
# virtual environment's python is a symlink to its base Python).
.bin_dir <- function(exe) normalizePath(dirname(path.expand(exe)), mustWork = FALSE)

.install_hint <- function() {
  paste(
    "Install parallel_gen into a Python environment and point R at it, once per session,",
    "before anything else uses Python:",
    "    python3 -m venv ~/.venvs/parallel_gen",
    "    ~/.venvs/parallel_gen/bin/pip install /path/to/parallel_gen",
    "  then in R:",
    "    parallelgen::pg_use_python(virtualenv = \"~/.venvs/parallel_gen\")",
    "  (or reticulate::use_virtualenv(\"~/.venvs/parallel_gen\", required = TRUE),",
    "  or RETICULATE_PYTHON=~/.venvs/parallel_gen/bin/python in ~/.Renviron).",
    sep = "\n")
}

# Imports a Python module (convert = FALSE), with a clear R error when it is missing.
.import_or_explain <- function(module) {
  tryCatch(reticulate::import(module, convert = FALSE), error = function(e) {
    python <- tryCatch(reticulate::py_config()$python, error = function(e2) "(none found)")
    msg <- sub("\\s+$", "", conditionMessage(e))
    .stop(c("pg_python_missing", "pg_error"),
          sprintf("the Python package '%s' cannot be imported from the Python that reticulate uses (%s): %s\n%s",
                  module, python, msg, .install_hint()), .user_call())
  })
}

# The parallel_gen module (convert = FALSE), imported once.
.pg <- function() {
  if (is.null(.pg_state$pg)) .pg_state$pg <- .import_or_explain("parallel_gen")
  .pg_state$pg
}

# The glue module (inst/python/parallelgen_r.py), imported once, converting to R.
.helpers <- function() {
  if (is.null(.pg_state$helpers)) {
    .pg()
    dir <- system.file("python", package = "parallelgen")
    if (!nzchar(dir)) .stop("pg_error", "parallelgen is not installed properly: inst/python is missing")
    .pg_state$helpers <- reticulate::import_from_path("parallelgen_r", path = dir, convert = TRUE)
  }
  .pg_state$helpers
}

.pg_attr <- function(name) reticulate::py_get_attr(.pg(), name)

# Calls the Python callable f(*args, **kwargs); a Python exception becomes an R error of
# class c("pg_<PythonClass>", ..., "pg_python_error", "pg_error", "error", "condition")
# whose message is the exception's own message (str(e)). The condition also carries
# python_class, python_exception and python_traceback.
.py_call <- function(f, args = list(), kwargs = list(), call = .user_call()) {
  kwargs <- if (length(kwargs)) reticulate::r_to_py(kwargs) else reticulate::dict()
  out <- .helpers()$call(f, unname(args), kwargs)
  err <- out[[1L]]
  if (!is.null(err)) {
    classes <- as.character(unlist(err[[1L]]))
    .stop(c(paste0("pg_", classes), "pg_python_error", "pg_error"), as.character(err[[2L]]), call,
          python_class = classes[[1L]], python_exception = err[[3L]],
          python_traceback = as.character(err[[4L]]))
  }
  out[[2L]]
}

# Signals an R error of the given classes (then "error", "condition"); `...` become
# fields of the condition. Callers catch by class: tryCatch(..., pg_argument_error = ).
.stop <- function(classes, message, call = NULL, ...) {
  stop(errorCondition(message, ..., class = classes, call = call))
}

.arg_error <- function(message, call = .user_call()) {
  .stop(c("pg_argument_error", "pg_error"), message, call)
}

# The innermost call of an exported pg_*() function on the stack, for error messages.
.user_call <- function() {
  for (cl in rev(sys.calls())) {
    fn <- cl[[1L]]
    if (is.call(fn) && as.character(fn[[1L]])[1L] %in% c("::", ":::")) fn <- fn[[3L]]
    if (is.name(fn) && startsWith(as.character(fn), "pg_")) return(cl)
  }
  NULL
}
