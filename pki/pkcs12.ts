import { createHash, createPrivateKey, randomBytes } from "node:crypto";
import forge from "node-forge";
import { PKI_CODES, PkiError } from "./errors.js";
import { readCertificates } from "./pem.js";

/** @default 10000 PBKDF2 / PKCS#12 KDF iterations. */
export const DEFAULT_P12_ITERATIONS = 10_000;

export interface Pkcs12Options {
  /** PREFIX.crt contents: leaf first, then the issuing CA. */
  certPem: string;
  /** PREFIX.key contents (PKCS#8, SEC 1 or PKCS#1 PEM). */
  keyPem: string;
  /** Protects the key (PBES2, AES-256-CBC, PBKDF2-HMAC-SHA256) and the file (HMAC-SHA256 MAC). */
  password: string;
  /** Shown by key stores; @default the leaf's subject CN */
  friendlyName?: string;
  iterations?: number;
}

const { asn1, pki, pkcs12 } = forge;
const seq = (items: forge.asn1.Asn1[]) => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, items);
const set = (items: forge.asn1.Asn1[]) => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SET, true, items);
const oid = (id: string) =>
  asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(id).getBytes());
const octets = (bytes: string) => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OCTETSTRING, false, bytes);
const explicit0 = (inner: forge.asn1.Asn1) => asn1.create(asn1.Class.CONTEXT_SPECIFIC, 0, true, [inner]);
const binary = (buf: Uint8Array) => forge.util.binary.raw.encode(buf);
const OID_SHA256 = "2.16.840.1.101.3.4.2.1";

/** A PKCS#7 `data` ContentInfo holding DER `inner`. */
function dataContent(inner: forge.asn1.Asn1): forge.asn1.Asn1 {
  return seq([oid(pki.oids.data!), explicit0(octets(asn1.toDer(inner).getBytes()))]);
}

/**
 * A PKCS#12 file with the key and its certificate chain, made with node-forge.
 * forge's own `toPkcs12Asn1` handles only RSA keys and certificates, so the
 * bags are assembled here from forge's ASN.1, PBES2 and PKCS#12 KDF; the key
 * (any type) travels as an encrypted PKCS#8 blob, which is key-type neutral.
 */
export function exportPkcs12(opts: Pkcs12Options): Buffer {
  const certs = readCertificates(opts.certPem, "the certificate file");
  const leaf = certs[0]!;
  let key: ReturnType<typeof createPrivateKey>;
  try {
    key = createPrivateKey(opts.keyPem);
  } catch (err) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, "the key file holds no readable private key", {
      cause: err,
      fix: "give the PREFIX.key written with the certificate (unencrypted PKCS#8 PEM)",
    });
  }
  if (!leaf.checkPrivateKey(key)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_KEY_MISMATCH, "the key does not belong to the certificate", {
      fix: "give the PREFIX.key written together with PREFIX.crt",
    });
  }
  const iterations = opts.iterations ?? DEFAULT_P12_ITERATIONS;
  const friendlyName = opts.friendlyName ?? /CN=([^\n]+)/.exec(leaf.subject)?.[1] ?? "shoal";
  const localKeyId = createHash("sha1").update(leaf.raw).digest();
  const attributes = (withName: boolean) =>
    set([
      seq([oid(pki.oids.localKeyId!), set([octets(binary(localKeyId))])]),
      ...(withName
        ? [
            seq([
              oid(pki.oids.friendlyName!),
              set([asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BMPSTRING, false, friendlyName)]),
            ]),
          ]
        : []),
    ]);

  const certBags = certs.map((cert, i) =>
    seq([
      oid(pki.oids.certBag!),
      explicit0(seq([oid(pki.oids.x509Certificate!), explicit0(octets(binary(cert.raw)))])),
      ...(i === 0 ? [attributes(true)] : []),
    ]),
  );
  const pkcs8 = asn1.fromDer(binary(key.export({ type: "pkcs8", format: "der" })));
  const encryptedKey = pki.encryptPrivateKeyInfo(pkcs8, opts.password, {
    algorithm: "aes256",
    count: iterations,
    saltSize: 16,
    prfAlgorithm: "sha256",
  } as forge.pki.EncryptionOptions);
  const keyBag = seq([oid(pki.oids.pkcs8ShroudedKeyBag!), explicit0(encryptedKey), attributes(true)]);
  const authSafe = seq([dataContent(seq(certBags)), dataContent(seq([keyBag]))]);

  const salt = binary(randomBytes(16));
  const macKey = pkcs12.generateKey(
    opts.password,
    forge.util.createBuffer(salt),
    3,
    iterations,
    32,
    forge.md.sha256.create(),
  );
  const hmac = forge.hmac.create();
  hmac.start("sha256", macKey.getBytes());
  hmac.update(asn1.toDer(authSafe).getBytes());
  const macData = seq([
    seq([
      seq([oid(OID_SHA256), asn1.create(asn1.Class.UNIVERSAL, asn1.Type.NULL, false, "")]),
      octets(hmac.digest().getBytes()),
    ]),
    octets(salt),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.INTEGER, false, asn1.integerToDer(iterations).getBytes()),
  ]);
  const pfx = seq([
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.INTEGER, false, asn1.integerToDer(3).getBytes()),
    dataContent(authSafe),
    macData,
  ]);
  return Buffer.from(asn1.toDer(pfx).getBytes(), "binary");
}
