import { isIPv6 } from "node:net";

/**
 * The key a per-client limit counts an address under: an IPv4 address as it
 * is (an IPv4-mapped IPv6 one too), an IPv6 address by its /64. One site or
 * one customer is given a /64, and so 2^64 addresses to rotate through: counted
 * one by one, every per-address limit would be no limit for it.
 */
export function clientKey(address: string): string {
  const bare = address.split("%")[0] ?? address; // a zone id (fe80::1%eth0) names no other host
  if (!isIPv6(bare)) return address;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(bare);
  if (mapped?.[1]) return mapped[1];
  const [head = "", tail] = bare.split("::");
  const groups = (part: string) =>
    part ? part.split(":").flatMap((g) => (g.includes(".") ? ["0", "0"] : [g])) : [];
  const front = groups(head);
  const back = tail === undefined ? [] : groups(tail);
  const all =
    tail === undefined ? front : [...front, ...Array(8 - front.length - back.length).fill("0"), ...back];
  return `${all
    .slice(0, 4)
    .map((g) => Number.parseInt(g, 16).toString(16))
    .join(":")}::/64`;
}
