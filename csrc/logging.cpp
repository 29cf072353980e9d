#include "logging.hpp"

#include <cstdio>
#include <mutex>

#include "llama.h"

namespace pg {
namespace {

struct Previous {
    ggml_log_callback cb = nullptr;
    void *            ud = nullptr;
};

Previous   g_prev;
std::once_flag g_once;

thread_local int         t_depth   = 0;
thread_local bool        t_verbose = false;
thread_local std::string t_errors;
thread_local ggml_log_level t_last_level = GGML_LOG_LEVEL_NONE;

void route(ggml_log_level level, const char * text, void * /*ud*/) {
    if (t_depth == 0) {
        if (g_prev.cb) {
            g_prev.cb(level, text, g_prev.ud);
        }
        return;
    }
    // CONT continues the previous message at the previous level.
    ggml_log_level eff = level == GGML_LOG_LEVEL_CONT ? t_last_level : level;
    t_last_level = eff;
    if (eff == GGML_LOG_LEVEL_ERROR || eff == GGML_LOG_LEVEL_WARN) {
        if (level != GGML_LOG_LEVEL_CONT && !t_errors.empty() && t_errors.back() != '\n') {
            t_errors += '\n';  // a new message: keep it apart from the previous one
        }
        t_errors += text;
        if (t_errors.size() > 4096) {  // keep the tail: the last lines name the cause
            t_errors.erase(0, t_errors.size() - 4096);
        }
    }
    if (t_verbose) {
        std::fputs(text, stderr);
    }
}

}  // namespace

void install_log_router() {
    std::call_once(g_once, [] {
        llama_log_get(&g_prev.cb, &g_prev.ud);
        llama_log_set(route, nullptr);
    });
}

LogScope::LogScope(bool verbose) : prev_depth_(t_depth), prev_verbose_(t_verbose) {
    if (t_depth == 0) {
        t_errors.clear();
    }
    ++t_depth;
    t_verbose = verbose;
}

LogScope::~LogScope() {
    t_depth   = prev_depth_;
    t_verbose = prev_verbose_;
}

std::string take_log_errors() {
    std::string out;
    out.swap(t_errors);
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) {
        out.pop_back();
    }
    // One line for an exception message: llama.cpp's messages joined with "; ".
    std::string joined;
    for (char c : out) {
        if (c == '\n') {
            if (!joined.empty() && joined.back() != ' ') {
                joined += "; ";
            }
        } else {
            joined += c;
        }
    }
    return joined;
}

}  // namespace pg
