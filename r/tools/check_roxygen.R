# Checks that the committed NAMESPACE and man/*.Rd are what roxygen2 writes from the #'
# comments in R/ (they have one source: those comments). Exits 1 listing the files that
# differ, with the command that regenerates them.
#
#   Rscript r/tools/check_roxygen.R          (run by r/tools/run_tests.R, so by make test-r)

args <- commandArgs(trailingOnly = FALSE)
script <- sub("^--file=", "", grep("^--file=", args, value = TRUE)[1L])
pkg <- normalizePath(file.path(dirname(script), ".."), mustWork = TRUE)
if (!requireNamespace("roxygen2", quietly = TRUE)) {
  cat("error: the R package roxygen2 is needed to check NAMESPACE and man/ (Debian: r-cran-roxygen2)\n")
  quit(status = 1L)
}

copy <- file.path(tempfile("parallelgen-roxygen-"), "r")
dir.create(copy, recursive = TRUE)
invisible(file.copy(list.files(pkg, full.names = TRUE), copy, recursive = TRUE))
unlink(c(file.path(copy, "NAMESPACE"), file.path(copy, "man")), recursive = TRUE)
suppressMessages(roxygen2::roxygenise(copy))

read <- function(root, f) if (file.exists(file.path(root, f))) readLines(file.path(root, f)) else NULL
files <- union(c("NAMESPACE", file.path("man", list.files(file.path(pkg, "man")))),
               c("NAMESPACE", file.path("man", list.files(file.path(copy, "man")))))
stale <- files[!vapply(files, function(f) identical(read(pkg, f), read(copy, f)), logical(1))]
unlink(dirname(copy), recursive = TRUE)
if (length(stale)) {
  cat("error: not what roxygen2 writes from R/ (regenerate with",
      "Rscript -e 'roxygen2::roxygenise(\"r\")'):", paste(stale, collapse = ", "), "\n")
  quit(status = 1L)
}
cat("NAMESPACE and man/ match roxygen2's output\n")
