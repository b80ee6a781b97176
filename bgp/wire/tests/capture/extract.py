#!/usr/bin/env python3
"""Cuts the BGP messages out of a pcap of TCP port 179 and writes them as hex.

Usage: extract.py CAPTURE.pcap OUTDIR

Writes OUTDIR/bird2-to-gobgp.hex and OUTDIR/gobgp-to-bird2.hex: one message per line
(the whole framed message, header included), each preceded by a '#' comment naming
the TCP connection, the message's place and type. Only the standard library is used.
"""
import struct
import sys

NAMES = {"10.99.0.1": "bird2", "10.99.0.2": "gobgp"}
TYPES = {1: "OPEN", 2: "UPDATE", 3: "NOTIFICATION", 4: "KEEPALIVE", 5: "ROUTE-REFRESH"}


def packets(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[pos : pos + 16])
        pkt = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if linktype == 1:
            if struct.unpack(">H", pkt[12:14])[0] != 0x0800:
                continue
            ip = pkt[14:]
        elif linktype == 113:  # Linux cooked capture
            ip = pkt[16:]
        else:
            raise SystemExit(f"unsupported link type {linktype}")
        if ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        src = ".".join(map(str, ip[12:16]))
        dst = ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        flags = tcp[13]
        off = (tcp[12] >> 4) * 4
        yield (src, sport, dst, dport), seq, flags, tcp[off:]


def main():
    pcap, outdir = sys.argv[1], sys.argv[2]
    flows = {}  # key -> [next_seq, bytes, connection number]
    order = []
    for key, seq, flags, payload in packets(pcap):
        if flags & 0x02:  # SYN
            flows[key] = [seq + 1, bytearray(), None]
            continue
        st = flows.get(key)
        if st is None or not payload:
            continue
        if st[2] is None:
            conn = {tuple(sorted([k[1], k[3]])) for k in order}
            st[2] = len(conn | {tuple(sorted([key[1], key[3]]))})
            order.append(key)
        nxt = st[0]
        if seq + len(payload) <= nxt:
            continue  # retransmission
        if seq > nxt:
            raise SystemExit(f"gap in {key}: expected {nxt}, got {seq}")
        st[1] += payload[nxt - seq :]
        st[0] = seq + len(payload)
    out = {}
    for key in order:
        nxt, buf, conn = flows[key]
        name = f"{NAMES.get(key[0], key[0])}-to-{NAMES.get(key[2], key[2])}"
        lines = out.setdefault(name, [])
        pos, n = 0, 0
        while pos + 19 <= len(buf):
            length = struct.unpack(">H", buf[pos + 16 : pos + 18])[0]
            if length < 19 or pos + length > len(buf):
                break
            msg = bytes(buf[pos : pos + length])
            n += 1
            lines.append(f"# connection {conn} message {n}: {TYPES.get(msg[18], msg[18])} ({length} bytes)")
            lines.append(msg.hex())
            pos += length
    for name, lines in out.items():
        with open(f"{outdir}/{name}.hex", "w") as f:
            f.write(f"# BGP messages {name.replace('-to-', ' -> ')}, cut from bird2-gobgp.pcap by extract.py.\n")
            f.write("\n".join(lines) + "\n")
        print(f"{name}: {sum(1 for l in lines if not l.startswith('#'))} messages")


if __name__ == "__main__":
    main()
