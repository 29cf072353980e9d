test_that("conversations in every R form become the same Python structure", {
  f <- parallelgen:::.check_conversations
  hi <- list(list(role = "user", content = "hi"))
  expect_identical(f("hi"), list(hi))
  expect_identical(f(c("hi", "hi")), list(hi, hi))
  expect_identical(f(list("hi")), list(hi))
  expect_identical(f(data.frame(role = "user", content = "hi")), list(hi))
  expect_identical(f(list(data.frame(role = "user", content = "hi", stringsAsFactors = TRUE))), list(hi))
  expect_identical(f(list(hi)), list(hi))
  expect_identical(f(list(list(c(role = "user", content = "hi")))), list(hi))
  expect_identical(f(character(0)), list())
  with_system <- f(c("hi", "hi"), system = "Be brief.")
  expect_identical(with_system[[2]], c(list(list(role = "system", content = "Be brief.")), hi))
  has_system <- list(list(list(role = "system", content = "Own."), hi[[1]]))
  expect_identical(f(has_system, system = "Be brief."), has_system)
})

test_that("pg_chat rejects NA and malformed conversations with R errors naming the place", {
  m <- test_model()
  expect_error(pg_chat(m, c("hi", NA)), "conversations[2]", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(list(role = "user", content = NA_character_)))),
               "conversations[[1]][[1]]$content is NA", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list("ok", data.frame(role = c("user", NA), content = c("a", "b")))),
               "conversations[[2]][[2]]$role is NA", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list(role = "user", content = "hi")), "single message", class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(role = "user", content = "hi"))), "wrap it in list()", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(list(role = "user")))), "must be a message", class = "pg_argument_error")
  expect_error(pg_chat(m, 1:2), "conversations", class = "pg_argument_error")
  expect_error(pg_chat(m, "hi", system = NA_character_), "`system`", class = "pg_argument_error")
})

test_that("pg_chat answers every conversation, in order, on the real model", {
  m <- test_model()
  convs <- list("What is the capital of France?",
                data.frame(role = c("system", "user"),
                           content = c("You are terse.", "Name a yellow fruit.")),
                list(list(role = "user", content = "Say hello in Spanish.")))
  out <- pg_chat(m, convs, max_tokens = 8, temperature = 0, seed = 1, progress = FALSE)
  expect_s3_class(out, "data.frame")
  expect_named(out, c("prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
                     "error"))
  expect_identical(nrow(out), 3L)
  expect_true(all(out$finish_reason %in% c("stop", "length")))
  expect_true(all(is.na(out$error)))
  expect_true(all(out$completion_tokens >= 1L & out$completion_tokens <= 8L))
  expect_match(out$prompt[1], "capital of France", fixed = TRUE)
  expect_match(out$prompt[2], "yellow fruit", fixed = TRUE)
  expect_match(out$prompt[2], "You are terse.", fixed = TRUE)
  expect_match(out$prompt[3], "hello in Spanish", fixed = TRUE)
  expect_identical(pg_stats()$prompts, 3L)

  one <- pg_chat(m, "Hi!", max_tokens = 2, progress = TRUE)  # a bar, or a note that tqdm is missing
  expect_identical(nrow(one), 1L)
  sys <- pg_chat(m, c("Hi!", "Bye!"), system = "Answer in French.", max_tokens = 2, progress = FALSE)
  expect_true(all(grepl("Answer in French.", sys$prompt, fixed = TRUE)))
  expect_error(pg_chat(m, "Hi!", max_tokens = 0, progress = FALSE), class = "pg_python_error")
  expect_error(pg_chat(m, "Hi!", progress = "yes"), "`progress` must be TRUE or FALSE", class = "pg_argument_error")
})

weather_tools <- '[{"type": "function", "function": {"name": "get_weather",
  "description": "Current weather in a city.",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]'

test_that("pg_chat with tools: a tool_calls list column, one data.frame of calls per row", {
  m <- test_model()
  out <- pg_chat(m, c("What is the weather in Paris?", "What is the weather in Rome?"), tools = weather_tools,
                 tool_choice = "required", parallel_tool_calls = FALSE, max_tokens = 60, temperature = 0,
                 progress = FALSE)
  expect_named(out, c("prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
                     "error", "content", "tool_calls"))
  expect_identical(out$finish_reason, c("tool_calls", "tool_calls"))
  expect_true(is.list(out$tool_calls))
  for (calls in out$tool_calls) {
    expect_s3_class(calls, "data.frame")
    expect_named(calls, c("id", "name", "arguments"))
    expect_identical(nrow(calls), 1L)
    expect_identical(calls$name, "get_weather")
    args <- reticulate::import("json")$loads(calls$arguments)
    expect_true(is.character(args$city) && nzchar(args$city))
  }
  expect_false(identical(out$tool_calls[[1]]$id, out$tool_calls[[2]]$id))
  expect_match(out$prompt[1], "get_weather", fixed = TRUE)  # the tools are in the prompt

  # The same tools as R lists (a JSON array written as list()), and a named tool.
  as_list <- list(list(type = "function", "function" = list(
    name = "get_weather", description = "Current weather in a city.",
    parameters = list(type = "object", properties = list(city = list(type = "string")), required = list("city")))))
  named <- pg_chat(m, "Weather in Oslo?", tools = as_list, tool_choice = "get_weather",
                   parallel_tool_calls = FALSE, max_tokens = 60, temperature = 0, progress = FALSE)
  expect_identical(named$tool_calls[[1]]$name, "get_weather")

  # Without a call ("none"): zero-row data.frames, the answer in content.
  none <- pg_chat(m, "Say hi.", tools = weather_tools, tool_choice = "none", max_tokens = 8, temperature = 0,
                  progress = FALSE)
  expect_identical(nrow(none$tool_calls[[1]]), 0L)
  expect_identical(none$content, none$text)
})

test_that("pg_chat rejects bad tools with errors naming the field", {
  m <- test_model()
  expect_error(pg_chat(m, "hi", tools = "[{", progress = FALSE), "`tools` is not valid JSON",
               class = "pg_argument_error")
  expect_error(pg_chat(m, "hi", tools = 3, progress = FALSE), "`tools` must be JSON text or a list",
               class = "pg_argument_error")
  expect_error(pg_chat(m, "hi", tools = weather_tools, tool_choice = "get_time", progress = FALSE),
               "'get_time' is not one of the tools", fixed = TRUE, class = "pg_ValueError")
  expect_error(pg_chat(m, "hi", tool_choice = "required", progress = FALSE), "needs tools",
               class = "pg_ValueError")
  expect_error(pg_chat(m, "hi", tools = weather_tools, parallel_tool_calls = NA, progress = FALSE),
               "`parallel_tool_calls` must be TRUE or FALSE", class = "pg_argument_error")
})
