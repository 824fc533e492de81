"""The gRPC server's limits and timers (read at use, so tests may change them)."""

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_CONNECTIONS = 4
MAX_STREAMS = 16  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS); a client exceeding it loses the connection
SPARE_BUFFER_BYTES = 1024 * 1024  # a connection buffers at most max_message_bytes + this across its streams
MAX_HEADER_LIST_BYTES = 16 * 1024
WINDOW_BYTES = 1024 * 1024  # our receive window, per stream and for the connection
IDLE_SECONDS = 30.0  # virt-launcher closes its connection after the call; a held one frees its slot
SEND_TIMEOUT_SECONDS = 30.0  # a client that stops reading our answer for this long is dropped
#: a call whose request or answer is larger is followed, once done, by malloc_trim (see .memory): a
#: worker's arena keeps what its largest call used (~30x the domain XML) otherwise
TRIM_AFTER_BYTES = 128 * 1024
ACCEPT_BACKOFF_SECONDS = 0.05  # after accept() failed for want of resources (EMFILE...)
