# Run by R CMD check. From the repository, use `make test-r` (or Rscript r/tools/run_tests.R).
library(testthat)
library(parallelgen)

test_check("parallelgen")
