/**
 * The S3 client factory. Checksums are a deliberate choice: the SDK's default (CRC32 on every
 * upload, validated on every download, since 3.729) breaks S3-compatible servers and costs CPU
 * in pure JS; the migrator computes and stores its own SHA-256/MD5 instead and asks for
 * checksums only where an operation requires one.
 */
import { S3Client } from "@aws-sdk/client-s3";
import type { S3Config } from "../config/mod.ts";

export function createS3Client(config: S3Config): S3Client {
  return new S3Client({
    region: config.region,
    endpoint: config.endpoint,
    forcePathStyle: config.forcePathStyle,
    credentials: config.accessKeyId && config.secretAccessKey
      ? { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey }
      : undefined,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
    maxAttempts: 3,
  });
}
