// splitq tools: the throttle proxy behind `splitq throttle --listen HOST:PORT --to (HOST:PORT | -)
// [--mbit R]`: a TCP proxy that carries
// each direction at most R Mbit/s (default 100), for measuring training over a slow link where `tc`
// and network namespaces are not available (scripts/link-bench.sh uses it then).
//
// Each direction is one pacer shared by every connection, like one link: a chunk of n bytes
// (at most 64 KiB) leaves when the link has finished sending the bytes before it, and takes
// n / rate seconds. That is a tbf with a 64 KiB burst and no queue limit. Latency is not added.
// Prints "throttle listening on HOST:PORT"; stops on SIGINT/SIGTERM.
//
// `--to -` reads the target's HOST:PORT as one line from stdin after listening (connections
// wait in the backlog until then), so both ends can take ports the OS picks: start the
// throttle, give its port to the server as the port to advertise, then write the server's.
#pragma once

#include <atomic>
#include <functional>
#include <string>

namespace splitq::tools {

struct ThrottleOptions {
  std::string listen = "127.0.0.1:0", to;
  double mbit = 100;
};

// Proxies until `stop` is set. `serving` (may be empty) is called once it listens and knows its
// target (the CLI installs its signal handlers there, so that Ctrl-C before that still ends the
// process at once). Returns the process exit code: 0, 1 (cannot listen), 2 (bad flags or no
// target on stdin); errors are printed to stderr.
int RunThrottle(const ThrottleOptions& options, const std::atomic<bool>& stop,
                const std::function<void()>& serving = {});

}  // namespace splitq::tools
