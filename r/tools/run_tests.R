# Runs the testthat suite of the R package parallelgen (r/): installs the package into a
# temporary library with R CMD INSTALL, then runs r/tests/testthat against it. First it
# checks that NAMESPACE and man/ are roxygen2's output (tools/check_roxygen.R).
#
#   RETICULATE_PYTHON=/path/to/.venv/bin/python Rscript r/tools/run_tests.R
#
# (`make test-r` does this with the project's .venv.) Without the R packages reticulate
# and testthat it prints a notice and exits 0, or exits 1 when PG_REQUIRE_R=1.

required <- identical(Sys.getenv("PG_REQUIRE_R"), "1")
needed <- c("reticulate", "testthat")
missing <- needed[!vapply(needed, requireNamespace, logical(1), quietly = TRUE)]
if (length(missing)) {
  cat(sprintf("%s: R package(s) %s not installed: %s the R tests (Debian: apt-get install %s)\n",
              if (required) "error" else "notice", paste(missing, collapse = ", "),
              if (required) "cannot run" else "skipping",
              paste0("r-cran-", missing, collapse = " ")))
  quit(status = if (required) 1L else 0L)
}

args <- commandArgs(trailingOnly = FALSE)
script <- sub("^--file=", "", grep("^--file=", args, value = TRUE)[1L])
pkg <- normalizePath(file.path(dirname(script), ".."), mustWork = TRUE)
if (!nzchar(Sys.getenv("RETICULATE_PYTHON"))) {
  cat("note: RETICULATE_PYTHON is not set: reticulate chooses a Python itself\n")
}

# NAMESPACE and man/ must be roxygen2's output of R/ (exports have one source).
if (requireNamespace("roxygen2", quietly = TRUE)) {
  if (system2(file.path(R.home("bin"), "Rscript"), shQuote(file.path(pkg, "tools", "check_roxygen.R"))) != 0L) {
    quit(status = 1L)
  }
} else {
  cat(sprintf("%s: R package roxygen2 not installed: %s (Debian: apt-get install r-cran-roxygen2)\n",
              if (required) "error" else "notice",
              if (required) "cannot check NAMESPACE and man/" else "not checking NAMESPACE and man/"))
  if (required) quit(status = 1L)
}

lib <- tempfile("parallelgen-lib-")
dir.create(lib)
status <- system2(file.path(R.home("bin"), "R"),
                  c("CMD", "INSTALL", "--no-test-load", paste0("--library=", shQuote(lib)), shQuote(pkg)),
                  stdout = FALSE)
if (status != 0L) {
  cat("error: R CMD INSTALL of", pkg, "failed\n")
  quit(status = 1L)
}
.libPaths(c(lib, .libPaths()))

t0 <- proc.time()[["elapsed"]]
result <- tryCatch(
  testthat::test_dir(file.path(pkg, "tests", "testthat"), package = "parallelgen",
                     load_package = "installed", stop_on_failure = TRUE),
  error = function(e) {
    cat("R tests failed:", conditionMessage(e), "\n")
    quit(status = 1L)
  })
cat(sprintf("R tests passed in %.1f s\n", proc.time()[["elapsed"]] - t0))
unlink(lib, recursive = TRUE)
