"""Operations that read adapters and write new ones: reduce, combine, quantize; and diff, which only reads."""
