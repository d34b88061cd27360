"""Ethernet/IPv4/TCP frames for the packet benchmarks (valid checksums, deterministic
payload), and the 4-byte big-endian length framing that QEMU's net sockets, colo-compare's
chardevs and netcmp's `unix:` ports use: building, encoding, decoding and reading frames."""

import random
import socket
import struct

from benchlib import RunError

SERVER_MAC = bytes.fromhex("525400000001")
CLIENT_MAC = bytes.fromhex("525400000002")
SERVER = ("10.0.0.1", 6379)
CLIENT = ("10.0.0.2", 40000)

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ETH_HLEN = 14
LEN = struct.Struct(">I")

# ---------------------------------------------------------------------------------------
# frames


def checksum(data):
    """Internet checksum (RFC 1071) of `data`: the 16-bit one's-complement sum equals the
    big-endian integer modulo 0xffff (2**16 = 1 mod 0xffff)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return 0xFFFF - s


def ipv4_header(src, dst, proto, payload_len, ident, ttl=64):
    """A 20-byte IPv4 header (DF set, no options) with its checksum."""
    h = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident & 0xFFFF, 0x4000, ttl,
                    proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack(">H", checksum(h)) + h[12:]


def tcp_frame(src, dst, seq, ack, flags, payload=b"", *, ident=1, window=65535, ttl=64,
              src_mac=SERVER_MAC, dst_mac=CLIENT_MAC, bad_checksum=False):
    """Ethernet + IPv4 + TCP (20-byte header, no options) frame from `src` (ip, port) to
    `dst`, with valid IP and TCP checksums (unless bad_checksum: TCP checksum off by one)."""
    (sip, sport), (dip, dport) = src, dst
    tcp = struct.pack(">HHIIHHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (5 << 12) | flags, window, 0, 0)
    pseudo = socket.inet_aton(sip) + socket.inet_aton(dip) + struct.pack(">BBH", 0, 6, len(tcp) + len(payload))
    csum = checksum(pseudo + tcp + payload)
    if bad_checksum:
        csum ^= 1
    tcp = tcp[:16] + struct.pack(">H", csum) + tcp[18:]
    ip = ipv4_header(sip, dip, 6, len(tcp) + len(payload), ident, ttl)
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp + payload


def udp_frame(src, dst, payload, *, ident=1):
    """Ethernet + IPv4 + UDP frame with valid checksums."""
    (sip, sport), (dip, dport) = src, dst
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0)
    pseudo = socket.inet_aton(sip) + socket.inet_aton(dip) + struct.pack(">BBH", 0, 17, len(udp) + len(payload))
    csum = checksum(pseudo + udp + payload) or 0xFFFF
    udp = udp[:6] + struct.pack(">H", csum)
    return CLIENT_MAC + SERVER_MAC + b"\x08\x00" + ipv4_header(sip, dip, 17, len(udp) + len(payload), ident) + udp + payload


def raw_frame(tag, size=60, ethertype=0x88B5):
    """A non-IP frame (IEEE local experimental ethertype) carrying `tag`: colo-compare
    forwards such frames from primary_in unchanged, without comparing."""
    body = tag.to_bytes(8, "big")
    return CLIENT_MAC + SERVER_MAC + struct.pack(">H", ethertype) + body + bytes(max(0, size - 22))


def ipv6_frame(payload, src="fd00::1", dst="fd00::2"):
    """Ethernet + IPv6 frame, next header 59 (none) carrying `payload`."""
    ip6 = struct.pack(">IHBB16s16s", 6 << 28, len(payload), 59, 64, socket.inet_pton(socket.AF_INET6, src),
                      socket.inet_pton(socket.AF_INET6, dst))
    return CLIENT_MAC + SERVER_MAC + b"\x86\xdd" + ip6 + payload


def payload_bytes(total, seed=0):
    """`total` deterministic pseudo-random bytes."""
    rng, block = random.Random(seed), 1 << 20
    return b"".join(rng.randbytes(min(block, total - off)) for off in range(0, total, block))


def frames_tcp_stream(total_bytes, mss=1448, *, src=SERVER, dst=CLIENT, isn=1_000_000,
                      ack=2_000_000, syn_ack=False, seed=0, ident=1, payload=None):
    """One TCP stream from `src` to `dst` (default server 10.0.0.1:6379 -> client
    10.0.0.2:40000): `total_bytes` of deterministic payload in `mss`-sized segments (the
    last one shorter), flags ACK (+PSH on the last), the same ACK number throughout, IP ids
    counting up from `ident`. With syn_ack, a SYN-ACK (seq `isn`) comes first and the data
    starts at isn + 1; colo-compare does not need it. `payload` overrides the content."""
    if mss <= 0 or total_bytes < 0:
        raise ValueError("mss must be positive, total_bytes non-negative")
    data = payload if payload is not None else payload_bytes(total_bytes, seed)
    frames = []
    seq = isn
    if syn_ack:
        frames.append(tcp_frame(src, dst, seq, ack, TCP_SYN | TCP_ACK, ident=ident))
        seq, ident = seq + 1, ident + 1
    view = memoryview(data)
    for off in range(0, len(data), mss):
        chunk = bytes(view[off:off + mss])
        last = off + mss >= len(data)
        frames.append(tcp_frame(src, dst, seq + off, ack, TCP_ACK | (TCP_PSH if last else 0), chunk,
                                ident=ident))
        ident += 1
    return frames


def tcp_payload_len(frame):
    """TCP payload bytes of an Ethernet+IPv4+TCP frame (0 for anything else)."""
    if len(frame) < ETH_HLEN + 20 or frame[12:14] != b"\x08\x00" or frame[ETH_HLEN + 9] != 6:
        return 0
    ihl = (frame[ETH_HLEN] & 0x0F) * 4
    total = struct.unpack_from(">H", frame, ETH_HLEN + 2)[0]
    doff = (frame[ETH_HLEN + ihl + 12] >> 4) * 4
    return total - ihl - doff


def encode(frames):
    """The framed byte stream of `frames`: per frame a 4-byte big-endian length, the frame."""
    return b"".join(LEN.pack(len(f)) + f for f in frames)


def decode(buf):
    """(frames, leftover bytes) of a framed byte stream."""
    frames, off, n = [], 0, len(buf)
    while off + 4 <= n:
        (ln,) = LEN.unpack_from(buf, off)
        if off + 4 + ln > n:
            break
        frames.append(bytes(buf[off + 4:off + 4 + ln]))
        off += 4 + ln
    return frames, bytes(buf[off:])


def recv_exact(sock, n):
    """Exactly `n` bytes from `sock` (RunError on EOF or timeout)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    try:
        while got < n:
            k = sock.recv_into(view[got:])
            if not k:
                raise RunError(f"EOF after {got} of {n} bytes")
            got += k
    except socket.timeout:
        raise RunError(f"timed out after {got} of {n} bytes") from None
    return bytes(buf)


def recv_frame(sock):
    """One framed frame from `sock`."""
    (ln,) = LEN.unpack(recv_exact(sock, 4))
    return recv_exact(sock, ln)


def drain(sock, wait):
    """Whatever arrives on `sock` within `wait` seconds of quiet, as bytes."""
    old = sock.gettimeout()
    sock.settimeout(wait)
    out = bytearray()
    try:
        while True:
            d = sock.recv(1 << 16)
            if not d:
                break
            out += d
    except socket.timeout:
        pass
    finally:
        sock.settimeout(old)
    return bytes(out)


def chunks(frames, n):
    """`frames` encoded in chunks of `n` frames."""
    return [encode(frames[i:i + n]) for i in range(0, len(frames), n)]

