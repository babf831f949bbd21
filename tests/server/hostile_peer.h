// Test helpers for hostile network peers against splitq's gRPC servers (rpc_test,
// worker_test): raw TCP connections from chosen loopback addresses, and an HTTP/2 peer that
// opens many calls and never finishes their request messages.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace splitq::server::hostile {

// A raw TCP connection from `source` (127.0.0.x) to 127.0.0.1:port; -1 on failure.
inline int Dial(const std::string& source, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in from{};
  from.sin_family = AF_INET;
  inet_pton(AF_INET, source.c_str(), &from.sin_addr);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof from) != 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// A hostile HTTP/2 peer (gRPC's wire protocol written by hand, plaintext), from `source`
// (127.0.0.x), with `token` as its bearer token ("" for none): on one connection it opens
// `streams` calls of `path`, each announcing a request message of `message_bytes`, and sends as
// much of the messages as the server's flow-control windows let it, never finishing one. It ignores
// the server's cap on concurrent streams (a peer need not obey it) and stops when the server has
// granted nothing for `idle`. Returns the bytes the server still holds for it: what it sent on
// streams the server has not reset, 0 when the server closed the connection (everything freed).
struct Flood {
  int64_t held = 0;             // bytes sent on streams still open
  int64_t sent = 0;             // bytes sent in all
  int refused = 0;              // streams the server ended (reset, or trailers)
  bool closed = false;          // the server closed the connection (GOAWAY or EOF)
  int64_t max_concurrent = -1;  // the server's SETTINGS_MAX_CONCURRENT_STREAMS (-1: none)
};

inline void PutFrame(std::string* out, uint8_t type, uint8_t flags, uint32_t stream,
                     const std::string& payload) {
  const uint32_t n = static_cast<uint32_t>(payload.size());
  const char head[9] = {static_cast<char>(n >> 16),
                        static_cast<char>(n >> 8),
                        static_cast<char>(n),
                        static_cast<char>(type),
                        static_cast<char>(flags),
                        static_cast<char>(stream >> 24),
                        static_cast<char>(stream >> 16),
                        static_cast<char>(stream >> 8),
                        static_cast<char>(stream)};
  out->append(head, 9);
  out->append(payload);
}

// HPACK "literal header field without indexing, new name", both strings raw (< 127 bytes).
inline void PutHeader(std::string* block, const std::string& name, const std::string& value) {
  block->push_back(0);
  block->push_back(static_cast<char>(name.size()));
  block->append(name);
  block->push_back(static_cast<char>(value.size()));
  block->append(value);
}

inline bool SendAll(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

inline uint32_t Be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

// A gRPC message's 5-byte prefix (not compressed, then the length, big-endian).
inline std::string MessagePrefix(uint32_t bytes) {
  return std::string{'\0', static_cast<char>(bytes >> 24), static_cast<char>(bytes >> 16),
                     static_cast<char>(bytes >> 8), static_cast<char>(bytes)};
}

// `first_message` (serialized; "" for none) is sent whole on every stream before the unfinished
// one: a session's hello, so that the unfinished message is a later one (with more than one
// stream, the same hello on each: at a worker, each replaces the session of the one before).
inline Flood FloodWithHalfRequests(int port, const std::string& path, int streams,
                                   uint32_t message_bytes, std::chrono::milliseconds idle,
                                   const std::string& source = "127.0.0.1",
                                   const std::string& token = "",
                                   const std::string& first_message = "") {
  // What each stream sends: the first message, then the prefix of the unfinished one; zeros
  // after that.
  std::string head;
  if (!first_message.empty()) {
    head = MessagePrefix(static_cast<uint32_t>(first_message.size())) + first_message;
  }
  head += MessagePrefix(message_bytes);
  Flood out;
  const int fd = Dial(source, port);
  if (fd < 0) return out;
  std::string start = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  PutFrame(&start, 4, 0, 0, "");  // our SETTINGS: the defaults
  int64_t connection_window = 65535;
  int64_t initial_window = 65535;
  std::vector<int64_t> window(streams, 0), sent(streams, 0), left(streams, 0);
  std::vector<bool> open(streams, true);
  for (int i = 0; i < streams; ++i) {
    std::string block;
    PutHeader(&block, ":method", "POST");
    PutHeader(&block, ":scheme", "http");
    PutHeader(&block, ":path", path);
    PutHeader(&block, ":authority", "127.0.0.1");
    PutHeader(&block, "content-type", "application/grpc");
    PutHeader(&block, "te", "trailers");
    if (!token.empty()) PutHeader(&block, "authorization", "Bearer " + token);
    PutFrame(&start, 1, 0x4, static_cast<uint32_t>(2 * i + 1), block);  // END_HEADERS
    window[i] = initial_window;
    left[i] = static_cast<int64_t>(head.size()) + message_bytes - 1;  // all but the last byte
  }
  if (!SendAll(fd, start)) {
    close(fd);
    return out;
  }
  std::string in;
  auto last_grant = std::chrono::steady_clock::now();
  const auto deadline = last_grant + std::chrono::seconds(60);
  while (!out.closed && std::chrono::steady_clock::now() < deadline &&
         std::chrono::steady_clock::now() - last_grant < idle) {
    // Send what the windows allow, in DATA frames of at most 16 KiB.
    for (int i = 0; i < streams && connection_window > 0; ++i) {
      while (open[i] && left[i] > 0 && window[i] > 0 && connection_window > 0) {
        const int64_t n = std::min<int64_t>({16384, left[i], window[i], connection_window});
        std::string payload(static_cast<size_t>(n), '\0');
        for (int64_t b = sent[i]; b < sent[i] + n && b < static_cast<int64_t>(head.size()); ++b) {
          payload[static_cast<size_t>(b - sent[i])] = head[static_cast<size_t>(b)];
        }
        std::string frame;
        PutFrame(&frame, 0, 0, static_cast<uint32_t>(2 * i + 1), payload);
        if (!SendAll(fd, frame)) {
          out.closed = true;
          break;
        }
        sent[i] += n;
        left[i] -= n;
        window[i] -= n;
        connection_window -= n;
        out.sent += n;
      }
    }
    // Read what the server says.
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    char buffer[65536];
    const ssize_t got = recv(fd, buffer, sizeof buffer, 0);
    if (got <= 0) {
      out.closed = true;
      break;
    }
    in.append(buffer, static_cast<size_t>(got));
    std::string reply;
    while (in.size() >= 9) {
      const auto* h = reinterpret_cast<const unsigned char*>(in.data());
      const size_t length = (size_t{h[0]} << 16) | (size_t{h[1]} << 8) | h[2];
      if (in.size() < 9 + length) break;
      const uint8_t type = h[3], flags = h[4];
      const uint32_t stream = Be32(h + 5) & 0x7fffffffu;
      const unsigned char* body = h + 9;
      const int index = stream == 0 ? -1 : static_cast<int>((stream - 1) / 2);
      if (type == 4 && !(flags & 1)) {  // SETTINGS: note them and acknowledge
        for (size_t k = 0; k + 6 <= length; k += 6) {
          const int id = (body[k] << 8) | body[k + 1];
          const int64_t value = Be32(body + k + 2);
          if (id == 3) out.max_concurrent = value;
          if (id == 4) {
            for (int i = 0; i < streams; ++i) window[i] += value - initial_window;
            initial_window = value;
          }
        }
        PutFrame(&reply, 4, 1, 0, "");
      } else if (type == 6 && !(flags & 1)) {  // PING: answer it
        PutFrame(&reply, 6, 1, 0, std::string(reinterpret_cast<const char*>(body), length));
      } else if (type == 8 && length == 4) {  // WINDOW_UPDATE
        const int64_t increment = Be32(body) & 0x7fffffff;
        if (stream == 0) {
          connection_window += increment;
        } else if (index < streams) {
          window[index] += increment;
        }
        last_grant = std::chrono::steady_clock::now();
      } else if (type == 3 || (type == 1 && (flags & 1))) {  // RST_STREAM, or trailers
        if (index >= 0 && index < streams && open[index]) {
          open[index] = false;
          ++out.refused;
        }
      } else if (type == 7) {  // GOAWAY
        out.closed = true;
      }
      in.erase(0, 9 + length);
    }
    if (!reply.empty() && !SendAll(fd, reply)) out.closed = true;
  }
  if (!out.closed) {
    for (int i = 0; i < streams; ++i) {
      if (open[i]) out.held += sent[i];
    }
  }
  close(fd);
  return out;
}

}  // namespace splitq::server::hostile
