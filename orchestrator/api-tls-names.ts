import { isIP, isIPv4 } from "node:net";
import type { NetworkInterfaceInfo } from "node:os";

/** The DNS names and IP addresses an API server certificate must carry. */
export interface ApiCertificateNames {
  dns: string[];
  ip: string[];
  /** Names left out because they are not valid DNS names (e.g. a host name with `_`). */
  skipped: string[];
}

const DNS_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

/** Addresses that mean "every interface": never a name a client can dial or a certificate should carry. */
const WILDCARD_HOSTS = new Set(["", "0.0.0.0", "::", "[::]", "*"]);

/**
 * An IP address in the one spelling used for comparing SANs: IPv4 as is, IPv6
 * as eight lower-case groups without leading zeros (node's `subjectAltName`
 * form), so `fd00::16` and `FD00:0:0:0:0:0:0:16` compare equal.
 */
export function canonicalIp(ip: string): string {
  const bare = ip.replace(/^\[|\]$/g, "").replace(/%.*$/, "");
  if (isIPv4(bare) || isIP(bare) !== 6) return bare;
  let text = bare.toLowerCase();
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4?.[1]) {
    const [a, b, c, d] = v4[1].split(".").map(Number) as [number, number, number, number];
    text = `${text.slice(0, -v4[1].length)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head = "", tail] = text.split("::");
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const zeros = tail === undefined ? [] : Array(8 - left.length - right.length).fill("0");
  return [...left, ...zeros, ...right].map((g) => Number.parseInt(g, 16).toString(16)).join(":");
}

/**
 * The names the API certificate must carry (pure; the caller passes the host
 * name and interfaces): always localhost and 127.0.0.1 (the orchestrator's own
 * clients dial loopback), this host's name, then
 * - when `host` is a wildcard (0.0.0.0, ::), every non-internal interface address;
 * - when `host` is a specific address or name, that host;
 * plus every `advertise` name or address. A wildcard is never a SAN.
 */
export function apiCertificateNames(input: {
  host: string;
  hostname: string;
  interfaces: NodeJS.Dict<NetworkInterfaceInfo[]>;
  advertise?: readonly string[];
}): ApiCertificateNames {
  const dns = new Set<string>(["localhost"]);
  const ip = new Set<string>(["127.0.0.1"]);
  const skipped: string[] = [];
  const add = (name: string) => {
    const n = name.trim().replace(/^\[|\]$/g, "");
    if (WILDCARD_HOSTS.has(n)) return;
    if (isIP(n.replace(/%.*$/, ""))) ip.add(canonicalIp(n));
    else {
      const d = n.toLowerCase().replace(/\.$/, "");
      if (d.length <= 253 && d.split(".").every((l) => DNS_LABEL.test(l))) dns.add(d);
      else skipped.push(name);
    }
  };
  add(input.hostname);
  if (WILDCARD_HOSTS.has(input.host.trim())) {
    for (const infos of Object.values(input.interfaces)) {
      for (const info of infos ?? []) {
        // Link-local IPv6 needs a zone id to be dialled, which no certificate can name.
        if (!info.internal && !(info.family === "IPv6" && info.address.toLowerCase().startsWith("fe80:"))) {
          add(info.address);
        }
      }
    }
  } else {
    add(input.host);
  }
  for (const a of input.advertise ?? []) add(a);
  return { dns: [...dns], ip: [...ip], skipped };
}
