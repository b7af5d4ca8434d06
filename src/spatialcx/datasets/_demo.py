"""A synthetic colon-mucosa SpatialData and a matching labelled scRNA-seq reference, made by code.

The tissue is a 1.2 mm x 0.8 mm section of human colon: surface epithelium and crypts (stem cells at the crypt base,
goblet cells and enterocytes above), lamina propria between the crypts, the muscularis mucosae, a submucosa with blood
vessels, and an isolated lymphoid follicle (B-cell core, T-cell rim) that pushes through the muscularis; more cells
make more such strips, at the same cell density. Counts come from a gamma-Poisson (negative binomial) model of
type-specific expression profiles built from real marker genes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatialcx._settings import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "CELL_TYPES",
    "HOUSEKEEPING_GENES",
    "MARKERS",
    "PROGRAMS",
    "REFERENCE_ONLY_CELL_TYPES",
    "SPATIAL_CELL_TYPES",
    "ZONES",
    "demo",
]

#: Cell types of the demo (exact Cell Ontology labels) and their CL term ids.
CELL_TYPES: dict[str, str] = {
    "enterocyte": "CL:0000584",
    "goblet cell": "CL:0000160",
    "intestinal crypt stem cell": "CL:0002250",
    "plasma cell": "CL:0000786",
    "B cell": "CL:0000236",
    "CD4-positive, alpha-beta T cell": "CL:0000624",
    "CD8-positive, alpha-beta T cell": "CL:0000625",
    "macrophage": "CL:0000235",
    "fibroblast": "CL:0000057",
    "endothelial cell": "CL:0000115",
    "smooth muscle cell": "CL:0000192",
    "mast cell": "CL:0000097",
    "enteroendocrine cell": "CL:0000164",
}

#: Types present in the tissue section (in this order in ``obs["true_cell_type"]``).
SPATIAL_CELL_TYPES: tuple[str, ...] = tuple(list(CELL_TYPES)[:11])

#: Types only the reference has (rare types the section happens to miss); their markers are on the panel.
REFERENCE_ONLY_CELL_TYPES: tuple[str, ...] = ("mast cell", "enteroendocrine cell")

#: Human marker genes of each type: high in that type, near zero elsewhere.
MARKERS: dict[str, tuple[str, ...]] = {
    "enterocyte": ("CA1", "CA2", "SLC26A3", "AQP8", "GUCA2A", "GUCA2B", "CEACAM7", "FABP1", "KRT20"),
    "goblet cell": ("MUC2", "TFF3", "SPINK4", "CLCA1", "FCGBP", "ZG16", "ITLN1", "REG4"),
    "intestinal crypt stem cell": ("LGR5", "OLFM4", "ASCL2", "SMOC2", "SOX9", "EPHB2", "RGMB"),
    "plasma cell": ("JCHAIN", "MZB1", "IGHA1", "IGKC", "XBP1", "SDC1", "TNFRSF17", "PRDM1", "DERL3"),
    "B cell": ("MS4A1", "CD79A", "CD19", "CD22", "BANK1", "PAX5", "FCRLA", "FCER2"),
    "CD4-positive, alpha-beta T cell": ("CD4", "CD40LG", "IL7R", "ICOS", "TNFRSF4", "CD28", "CCR7"),
    "CD8-positive, alpha-beta T cell": ("CD8A", "CD8B", "GZMK", "GZMA", "NKG7", "CCL5", "CRTAM"),
    "macrophage": ("CD68", "C1QA", "C1QB", "C1QC", "CD163", "MRC1", "CD14", "LYZ"),
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "ADAMDEC1"),
    "endothelial cell": ("PECAM1", "VWF", "CDH5", "PLVAP", "CLDN5", "KDR", "EMCN", "ACKR1"),
    "smooth muscle cell": ("ACTA2", "DES", "MYH11", "CNN1", "TAGLN", "ACTG2", "SYNPO2", "LMOD1"),
    "mast cell": ("TPSAB1", "TPSB2", "CPA3", "KIT", "MS4A2", "HDC"),
    "enteroendocrine cell": ("CHGA", "CHGB", "PYY", "GCG", "NEUROD1", "SCGN", "INSL5"),
}

_EPITHELIAL = ("enterocyte", "goblet cell", "intestinal crypt stem cell", "enteroendocrine cell")
_IMMUNE = (
    "plasma cell",
    "B cell",
    "CD4-positive, alpha-beta T cell",
    "CD8-positive, alpha-beta T cell",
    "macrophage",
    "mast cell",
)

#: Gene programmes shared by several types: genes and, per member type, the log-level offset (0 = full level).
PROGRAMS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "epithelial": (
        ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN7", "ELF3", "CLDN4"),
        dict.fromkeys(_EPITHELIAL, 0.0),
    ),
    "immune": (
        ("PTPRC", "CORO1A", "LCP1", "CD52", "ARHGDIB"),
        {**dict.fromkeys(_IMMUNE, 0.0), "plasma cell": -1.5, "mast cell": -0.7},
    ),
    "T cell": (
        ("CD3E", "CD3D", "CD3G", "CD2", "CD247", "TRAC"),
        {"CD4-positive, alpha-beta T cell": 0.0, "CD8-positive, alpha-beta T cell": 0.0},
    ),
    "antigen presentation": (
        ("HLA-DRA", "HLA-DRB1", "HLA-DPA1", "CD74"),
        {"B cell": 0.0, "macrophage": 0.0, "endothelial cell": -1.5, "intestinal crypt stem cell": -2.0},
    ),
    "B lineage": (("CD79B", "POU2AF1", "CD27"), {"B cell": 0.0, "plasma cell": -0.8}),
    "mesenchymal": (
        ("VIM", "SPARC", "IGFBP7", "COL4A1", "COL6A2"),
        {"fibroblast": 0.0, "endothelial cell": 0.0, "smooth muscle cell": 0.0, "macrophage": -1.5},
    ),
    "cell cycle": (("MKI67", "TOP2A", "PCNA", "TYMS"), {"intestinal crypt stem cell": 0.0, "B cell": -1.5}),
    "secretory": (("SPDEF", "ATOH1", "AGR2"), {"goblet cell": 0.0, "enteroendocrine cell": -0.5}),
}

#: Genes expressed at a high level in every type.
HOUSEKEEPING_GENES: tuple[str, ...] = (
    "ACTB",
    "GAPDH",
    "B2M",
    "RPLP0",
    "EEF1A1",
    "TPT1",
    "PPIA",
    "UBC",
    "HPRT1",
    "TBP",
    "PGK1",
    "POLR2A",
)

#: Further real panel genes (chemokines, receptors, transcription factors, tissue genes) with mild type signal.
_PANEL_EXTRA: tuple[str, ...] = tuple(
    """
    CCL2 CCL3 CCL4 CCL19 CCL20 CCL21 CCL25 CCR2 CCR4 CCR6 CCR9 CXCL1 CXCL2 CXCL8 CXCL9 CXCL10 CXCL12 CXCL13 CXCL14
    CXCR4 CXCR5 CX3CR1 IL1B IL2RA IL6 IL10 IL15 IL17A IL18 IL22 IL33 IL7 IFNG TNF TGFB1 TGFB3 OSM LTB TNFRSF9
    TNFRSF18 PDCD1 CD274 LAG3 HAVCR2 TIGIT FOXP3 GATA3 TBX21 RORC BCL6 IRF4 IRF8 SPI1 CEBPB ITGAX ITGAM ITGAE CD1C
    CLEC9A XCR1 LAMP3 CD86 CD80 FCGR3A FCGR1A CSF1R CSF1 CSF2RA S100A8 S100A9 MPO ELANE NCAM1 KLRD1 KLRB1 GNLY PRF1
    GZMB FCER1A CD69 SELL ITGB7 MADCAM1 EGFR ERBB2 ERBB3 MET KRT5 KRT7 MUC5AC MUC12 LYPD8 CEACAM5 CEACAM6 BEST4 OTOP2
    SPIB CA4 SLC26A2 PIGR DMBT1 LCN2 REG1A LEFTY1 HES1 NOTCH1 DLL1 DLL4 WNT2B WNT5A RSPO3 GREM1 BMP4 SFRP1 SFRP2 NRG1
    PDGFRB RGS5 NOTCH3 MCAM PDPN LYVE1 PROX1 CCL14 SELE SELP ICAM1 VCAM1 ANGPT2 ESM1 FLT1 TEK APLNR S100B PLP1 SOX10
    GFAP PHOX2B RET NOS1 VIP ANO1 MMP1 MMP2 MMP3 MMP9 TIMP1 POSTN FAP THY1 PI16 CD34 C3 C7 OGN MFAP5 HIF1A VEGFA MYC
    CCND1 CDK1 CDKN1A CDKN2A BIRC5 TP53 AXIN2 LGR4 CTNNB1 STAT3 JUN FOS EGR1 KLF4 KLF5 CDX1 CDX2 HNF4A SATB2 VIL1
    """.split()
)

#: Other human protein-coding genes, for the reference's whole-transcriptome part (low, mostly type-agnostic).
_BACKGROUND_GENES: tuple[str, ...] = tuple(
    """
    A4GNT AAAS AARSD1 AATBC ABAT ABCB10 ABCB6 ABCB8 ABCC5 ABCF1 ABHD11 ABHD14A ABHD14B ABHD3 ABI1 ABRAXAS2 ACAT2 ACD
    ACMSD ACOT1 ACOT6 ACSBG2 ACSM5 ACTA1 ACTG1 ACTL10 ACTL9 ACTN2 ACTN3 ACVRL1 ADAM10 ADAM11 ADAM17 ADAM2 ADAM32 ADAM7
    ADAMTS12 ADAMTS18 ADAMTS19 ADAMTS8 ADCY8 ADD1 ADGB ADGRF2 ADGRG7 ADH1B ADH6 ADRA1B AFAP1L1 AFF3 AFF4 AGA AGBL2
    AGBL3 AGBL4 AGR3 AHCY AHSP AK9 AKAP8L AKR1B15 AKT1 ALAD ALDH18A1 ALDH1L1 ALG3 ALG8 ALOXE3 ALX3 ALX4 AMER1 AMFR
    AMOTL2 AMY1A AMY2B ANAPC11 ANGEL1 ANKHD1 ANKRD12 ANKRD2 ANKRD34A ANKRD35 ANKRD36 ANKRD36C ANKRD40CL ANKRD46 ANKRD9
    ANO7 ANO8 ANO9 ANOS1 ANP32A ANP32B ANTXR1 AOC3 AOX1 AP1M2 AP2A1 AP3B1 AP3M1 APBA1 APCDD1L APEH APEX1 APLN APOBEC3A
    APOD APOL5 APOM AQP12B AQR ARFGEF3 ARG1 ARGFX ARHGAP11A ARHGEF35 ARID1A ARID5A ARIH1 ARL1 ARL10 ARL13B ARL17B
    ARL4C ARL4D ARLNC1 ARMC5 ARMC7 ARMCX6 ARMH2 ARMS2 ARNT2 ARPC1A ART4 ARTN ASAH1 ASB1 ASB16 ASB17 ASB5 ASCC1 ASF1B
    ASMT ASPM ATAD1 ATAT1 ATE1 ATF1 ATF2 ATG4A ATG9B ATM ATOH8 ATP2C1 ATP5F1C ATP5F1E ATP6V0D1 ATP6V1E2 ATP8A1 ATP8A2
    ATPAF1 ATR ATRAID ATXN2 ATXN3 ATXN8OS AURKB AVEN B3GAT1 B4GALNT4 B4GALT5 BABAM1 BACH1 BAG2 BAG4 BAGE2 BAMBI BANCR
    BANP BBS9 BBX BCAS4 BCDIN3D BCL10 BCL2L13 BCL2L14 BCLAF1 BICC1 BIRC6 BIVM BLCAP BLOC1S2 BLVRB BLZF1 BMI1 BMP8A
    BMPR1B BOLA1 BPIFA1 BPIFB2 BRD2 BRICD5 BSN BTBD16 BTBD19 BTC BTD BTF3 BTG1 BUD13 BUD31 BVES C1QTNF12 C1RL C2CD2 C5
    CA11 CACNA1A CACNA1S CACUL1 CAD CADM2 CALB1 CALB2 CALCA CALCOCO2 CALN1 CANT1 CAPN11 CAPN13 CAPN14 CAPN5 CARD9
    CARMIL3 CASC16 CASKIN2 CATIP CATSPER3 CBFA2T3 CBLL2 CBLN3 CBX1 CBX3 CBX4 CBX5 CBX6 CBY2 CCER2 CCL17 CCL8 CCM2 CCN3
    CCNB1 CCNC CCND3 CCNE2 CCNF CCNT2 CCNY CCNYL2 CCNYL7 CCR5 CCR8 CCT2 CCT8 CCZ1B CD1E CD2AP CD46 CD82 CDAN1 CDC42BPA
    CDC42BPB CDCA7 CDH22 CDH24 CDH8 CDHR1 CDK15 CDK16 CDKL1 CDKL4 CDO1 CDT1 CDY1 CDY1B CDY2A CDY2B CDYL CDYL2 CEACAM16
    CEBPA CEBPZOS CECR3 CELA1 CENPM CENPS CEPT1 CERKL CFC1 CFI CGB2 CGB3 CH25H CHCHD5 CHCHD6 CHD6 CHID1 CHML CHMP4A
    CHODL CHRFAM7A CHRNG CHST10 CHST15 CHSY1 CIART CIB2 CIB4 CILK1 CISD1 CLASRP CLCN1 CLCN3 CLCN4 CLDN17 CLDN20
    CLEC14A CLEC18B CLEC20A CLEC2A CLEC2D CLEC3B CLEC4C CLEC5A CLHC1 CLINT1 CLNK CLPS CLPTM1L CLU CLVS1 CMC2 CMPK1
    CMTM6 CMYA5 CNGA3 CNKSR2 CNOT10 CNOT4 CNOT6L CNOT9 CNR2 CNTFR CNTRL COCH COG2 COIL COL14A1 COL18A1 COL21A1 COL28A1
    COL5A1 COL5A3 COL6A1 COL6A3 COL9A3 COMMD5 COQ10A COX19 COX6A2 COX7B2 CPA4 CPB2 CPEB2 CPEB4 CPM CPNE4 CPNE6 CPOX
    CPT1C CRACD CRACDL CRADD CRAT CRB2 CRB3 CREB1 CRHBP CRHR1 CROCC CRYBG2 CRYGD CSDE1 CSF2 CSHL1 CSK CSMD1 CSNK2A1
    CSNK2B CSPG4P3Y CSPG4P4Y CST1 CST11 CST5 CSTF2T CT45A2 CT45A3 CT47A10 CT47A11 CT47A9 CT66 CT75 CTDSPL2 CTLA4
    CTNNA1 CTXND2 CUL1 CWC27 CXCL5 CYMP CYP11B2 CYP26C1 CYP27B1 CYP2D7 CYP2E1 CYP46A1 CYP4Z1 CYP7B1 CYP8B1 CYTH2 CYTH4
    CZIB D2HGDH DAB1 DAGLA DALRD3 DAOA DAPK2 DBNDD1 DBNDD2 DCAF10 DCAF12L1 DCAF4L1 DCAKD DCD DCHS1 DCK DCPS DCTN5
    DCUN1D1 DCUN1D2 DDC DDI2 DDOST DDTL DDX25 DDX3Y DDX4 DDX50 DDX54 DDX60 DEFA4 DEFB4B DELE1 DENND1B DENND2A DENND4B
    DENND6B DEPDC1 DESI2 DGKB DGKQ DHCR7 DHRS11 DHRS7 DHRS9 DHX15 DHX37 DIAPH2 DIP2A DIPK2A DIRAS2 DISC1 DIXDC1 DKK3
    DLG5 DLX2 DLX4 DMD DMGDH DMXL1 DNAAF3 DNAH10 DNAH11 DNAH6 DNAH9 DNAI4 DNAJB11 DNAJB12 DNAJB3 DNAJC24 DNHD1 DNPH1
    DOC2B DOCK4 DOCK6 DOK2 DOK6 DOK7 DONSON DOT1L DPF1 DPF3 DPH2 DPYD DRD2 DRD5 DSC2 DSEL DSG4 DTHD1 DTL DTYMK DUOX2
    DUOXA1 DUOXA2 DUS2 DUX4L15 DUX4L25 DUX4L3 DUX4L32 DUX4L37 DUX4L8 DUXA DYNC1H1 DYNC2I1 DYNLT5 DYSF EBP ECHS1 ECT2L
    EDA2R EDC4 EDRF1 EEF1AKMT2 EEF1AKMT4 EEFSEC EFCAB10 EFCAB6 EGF EGFL8 EID2 EIF1AY EIF2AK4 EIF3C EIF3E EIF3F EIF3G
    EIF4E3 ELF2 ELF5 ELFN1 ELOVL2 ELOVL7 EMG1 EMILIN1 EMILIN2 EML3 EN1 ENOX2 ENTPD2 ENTR1 EPB41 EPB41L2 EPB42 EPC2
    EPHB4 EPHX4 EPS8L2 EPSTI1 ERC2 ERCC1 ERCC4 ERCC6L2 ERFE ERG ERH ERLIN2 ERLNC1 ESPL1 ESRRB ETDA EVPL EVPLL EWSR1
    EXOC1 EXOC1L EXOC3 EXOC3L1 EXOSC3 EYA4 EZH1 EZH2 F13A1 F2RL3 FADS2 FAHD2A FANCM FASTKD5 FAT4 FAU FBRS FBXL12
    FBXL16 FBXL17 FBXL4 FBXO11 FBXO3 FBXO30 FBXO32 FBXO41 FCER1G FCGR1CP FCGRT FCN1 FCSK FEM1C FER1L6 FEZ2 FFAR1 FGA
    FGF10 FGF16 FGF6 FGL2 FHAD1 FHIP2A FHL3 FHOD1 FHOD3 FITM1 FKBPL FLAD1 FLT3LG FMO2 FMR1NB FNBP1L FNDC7 FNDC9 FOCAD
    FOXC2 FOXI1 FOXI3 FOXL1 FOXN3 FOXO1 FOXO3B FRG1 FRG1DP FRG2B FRG2GP FRG2IP FRMD1 FRMD3 FRMPD2 FRZB FSCN1 FUOM
    FUT10 FXN FXYD2 FYB1 FYTTD1 GABBR2 GABRA6 GABRB3 GABRG3 GABRR2 GAGE12E GALNT13 GALNT14 GALNT3 GALNT8 GALR1 GAMT
    GAREM1 GARRE1 GAS1RR GAS7 GASK1B GATD1 GAU1 GBX1 GCDH GCFC2 GCNT1 GCNT2 GCNT4 GCOM1 GDE1 GDNF GDPD2 GEMIN6 GGA3
    GGCT GHDC GHET1 GID8 GJA10 GJA9 GJB4 GJC1 GJD3 GJE1 GLCCI1 GLI1 GLP1R GLRA1 GLRB GLRX3 GLS2 GLT8D2 GLTPD2 GLYR1
    GMPS GNA11 GNA12 GNAI3 GNB1L GNE GNG12 GNPDA1 GNPTAB GNRHR2 GOLGA2P2Y GOLGA3 GOLGA4 GOLGA6D GOLGA6L22 GOLGA6L7
    GOLGA7 GOLGA8B GOLGA8DP GOLGA8G GOLGA8Q GOLGA8S GOLGA8T GOLT1B GON4L GORAB GPANK1 GPAT4 GPATCH11 GPATCH4 GPATCH8
    GPN3 GPR20 GPR21 GPR25 GPR26 GPR27 GPR33 GPR78 GPR88 GPR89A GPRC5C GPSM3 GPT GPX4 GRAMD2B GREB1L GRHL1 GRID2IP
    GRK1 GRM8 GRPEL1 GSDMA GSTK1 GSTM4 GSTO1 GSTO2 GTF2F2 GTF2H1 GTF3A GUCA1A GUCY2D GUCY2GP GUF1 GYS1 GZMH HACE1 HADH
    HADHA HAPLN4 HAT1 HAUS6 HBE1 HCCS HCG11 HCG15 HCRTR2 HDAC11 HDAC6 HDGFL3 HDLBP HECW2 HELB HELLPAR HELQ HELZ2 HEMGN
    HERPUD2 HES4 HES6 HES7 HGFAC HHIP HIBCH HIC1 HIF1AN HIGD1B HIRA HLCS HLTF HM13 HMGA1 HMGB1 HMGB3 HMOX1 HNRNPA3
    HNRNPCL3 HNRNPUL1 HOOK3 HOTAIR HOXB2 HPS1 HPS5 HPSE HPX HPYR1 HRH3 HSD17B3 HSD17B7 HSPB1 HTR1A HTR1D HTR1E HTR4
    HTR5A HTRA4 HUS1B HYI ICA1L ICE1 IDH3A IDH3G IDNK IDO2 IFI16 IFIT1B IFITM3 IFNA14 IFNA16 IFNA21 IFNE IFNL1 IFNW1
    IGDCC4 IGFALS IGIP IGLL1 IGSF9B IHH IK IL13 IL13RA1 IL16 IL1RAP IL20RB IL3 IL31 IL9R ILDR1 ILF3 IMPA2 INAVA INCENP
    INHBA INKA1 INKA2 INO80 INSC INTS1 INTS13 INTS9 IPMK IQCC IQCF1 IQCF2 IQCG IQCN IQSEC1 IRF1 IRF5 IRF7 IRGQ ISCA1
    ISX ITCH ITGA2 ITGA5 ITGA8 ITGB3 ITGB4 ITGB6 ITGB8 ITIH3 ITLN2 IVD IVNS1ABP JADRR JAK1 JAK3 JMJD1C JMJD7 JPH2
    KANSL2 KAT2A KAT8 KATNAL2 KCMF1 KCNA6 KCNAB2 KCNC1 KCNC3 KCND2 KCNE5 KCNG2 KCNH1 KCNH2 KCNH3 KCNJ12 KCNJ6 KCNK13
    KCNK15 KCNK2 KCNK6 KCNRG KCNU1 KCP KCTD18 KDELR2 KDM1A KDM1B KDM4C KDM5D KEL KHK KIF14 KIF19BP KIF2C KIF3B KIF4CP
    KIF5A KIFC2 KIR2DL3 KIR2DS4 KL KLC1 KLC3 KLF13 KLF15 KLHDC9 KLHL11 KLHL21 KLHL33 KLHL4 KLHL6 KLK12 KLK2 KMO KMT2A
    KNG1 KPNA2 KPNA3 KPNB1 KRR1 KRT13 KRT17 KRT36 KRT6C KRT72 KRT74 KRTDAP KTI12 L1CAM LAIR2 LAMA4 LATS1 LCA5L LCE1C
    LDAH LDB1 LDB3 LDLR LDLRAD4 LEO1 LETR1 LFNG LGALS7B LGALS9B LHFPL2 LHFPL4 LHPP LHX2 LHX3 LHX4 LHX8 LILRA1 LINS1
    LIPT1 LKAAEAR1 LLGL1 LMBR1 LMBRD2 LMNB1 LMNTD1 LMO2 LMO7 LMO7DN LMTK3 LMX1B LNX1 LONRF2 LONRF3 LPIN3 LPO LRCH3
    LRCH4 LRFN3 LRG1 LRGUK LRIG1 LRIG2 LRIT2 LRPPRC LRRC19 LRRC25 LRRC27 LRRC39 LRRC41 LRRC42 LRRC46 LRRC47 LRRC57
    LRRC66 LRRC70 LRRC8B LRRCC1 LRRIQ4 LRRK1 LRRN1 LRRN2 LRSAM1 LSM3 LSM8 LTC4S LTN1 LUC7L2 LY6G6C LY6G6F LYPD3 LYPD5
    LYPLA1 LYRM4 LYRM9 M1AP MADD MAG MAGEA11 MAGEA2B MAGEA9 MAGEB3 MAGEC3 MAGEH1 MALRD1 MAML1 MAML3 MAN1A1 MAN2B2
    MANBA MAP1LC3B MAP3K3 MAP3K6 MAP4K2 MAP7D3 MARCHF11 MARCKSL1 MARS1 MAST2 MATN2 MATN3 MAU2 MAVS MBD1 MBD3L2B MBD3L5
    MBD5 MCCC1 MCEE MCIDAS MCL1 MCM7 MCM8 MCRS1 MDGA1 MDGA2 MDH2 ME1 MED11 MED12 MED14OS MED15 MED18 MEGF11 METRN
    METTL14 METTL4 MEX3B MFHAS1 MFRP MFSD11 MFSD12 MFSD3 MFSD4B MGAM2 MGAT1 MGAT4B MGAT4D MIB1 MICB MICU1 MIDEAS MIEF2
    MIER2 MIPEP MIPOL1 MIS12 MISP MKRN2OS MLC1 MLXIPL MMD MOB1B MOGAT3 MON1B MORN2 MOS MOSMO MPC1L MPPED1 MRE11 MRGBP
    MRGPRD MROH1 MROH5 MRPL11 MRPL14 MRPL18 MRPL20 MRPL22 MRPL30 MRPL33 MRPL37 MRPL38 MRPL39 MRPL44 MRPL49 MRPS16
    MRPS18B MRPS6 MRPS9 MS4A3 MS4A6A MS4A8 MSANTD4 MSANTD5 MSC MSI1 MSL2 MSMP MST1 MSTN MSX2 MUC4 MUC5B MUSK MVK MXD4
    MXRA5 MXRA7 MYADML MYADML2 MYBPC2 MYBPC3 MYBPH MYCBPAP MYF5 MYF6 MYH4 MYH6 MYH8 MYL6 MYLK2 MYLK3 MYLK4 MYO3B
    MYOCOS MZT2B N4BP2L2 NAA15 NACC2 NADSYN1 NAGLU NAGPA NAIF1 NALCN NALF2 NANOS2 NAP1L3 NATD1 NBEAL1 NBPF8 NCMAP
    NCOA2 NCOR1 NDST3 NDUFA13 NDUFA6 NDUFAF5 NDUFAF8 NDUFB1 NDUFB11 NDUFB9 NDUFS1 NDUFS2 NDUFS6 NEIL1 NEK11 NEK7 NELFB
    NELFE NEPRO NETO2 NFE2L1 NFKBIL1 NFX1 NGEF NICN1 NID1 NID2 NIFK NINJ1 NINL NIPAL2 NKAIN4 NKAPL NKD2 NLGN2 NLGN3
    NMB NME6 NMRK2 NMS NMU NOA1 NOBOX NOC2L NOL4 NOL7 NOMO3 NOS2 NOTCH2NLA NOX5 NPBWR1 NPC2 NPFF NPIPA2 NPIPB11 NPIPB3
    NPIPB6 NPLOC4 NPM1 NPR2 NPRL3 NPTX2 NPW NPY NPY1R NQO2 NR1H2 NR2C2AP NR2E1 NR5A2 NR6A1 NRAD1 NRAS NRN1 NRSN2 NRXN1
    NSDHL NSMCE4A NT5C3A NTAQ1 NTHL1 NTM NTN5 NUDCD1 NUDCD3 NUDT13 NUGGC NUTM2F NVL NXF5 NXPE4 NXPH3 NXT1 NYNRIN
    OCIAD2 ODAM OFD1P10Y OFD1P15Y OFD1P4Y OFD1P8Y OLIG2 OMP OPN3 OPN4 OPTC OSCAR OSGEPL1 OSR2 OST4 OSTF1 OSTM1 OTC
    OTUD4 OTUD5 OTUD7A OTUD7B OVCH2 OVOL3 OXA1L OXGR1 OXLD1 P2RX6 P2RY10BP P2RY12 PA2G4 PABPC4 PACS1 PADI4 PADI6 PAEP
    PAG1 PAGE3 PAIP2B PAK1 PALM3 PAN3 PAPOLG PAPPA PAQR7 PARM1 PATE1 PATE4 PCAT5 PCED1A PCGF3 PCK2 PCNX4 PCOLCE PCSEAT
    PDCD5 PDE10A PDE5A PDK3 PDPK1 PDPR PDX1 PDYN PEA15 PEX14 PEX2 PEX5L PFDN4 PFKFB1 PFN4 PGA3 PGAM1 PGBD2 PGD PGM2L1
    PGM5 PHAX PHC1 PHETA2 PHF10 PHF8 PHGR1 PHLDB3 PHTF2 PIEZO1 PIGM PIGS PIH1D1 PIK3CA PIK3CB PILRA PIN4 PINLYP PINX1
    PIP5K1C PITPNM1 PITPNM3 PIWIL2 PIWIL3 PJA1 PJVK PKD2L2 PKDREJ PKIA PLA2G2A PLA2G4E PLA2G5 PLCB3 PLEK PLEKHG4B
    PLEKHG5 PLK1 PLOD1 PLXDC1 PMVK PNMA6A PNPLA4 POC1B POF1B POGK POLB POLD3 POLD4 POLE POLE3 POLG2 POLN POLR1E
    POLR3GL POLR3K POLRMT POMP POTEI POU4F2 PPARA PPARG PPIAL4A PPIC PPID PPIL4 PPM1E PPM1F PPM1H PPP1R14B PPP1R16A
    PPP1R1A PPP1R2B PPP2R2B PPP2R3A PPP2R5A PPP2R5B PPP2R5D PPP3CA PPP4C PPP4R1 PPP4R1L PPP4R4 PPP5C PPP6R1 PPP6R2
    PRAG1 PRAL PRAMEF12 PRAMEF14 PRAMEF25 PRAMEF4 PRAMEF5 PRAMEF6 PRAMEF9 PRDM12 PRDM16 PRDM9 PRDX1 PRDX5 PREB PRG4
    PRICKLE2 PRIMPOL PRKACA PRKAG1 PRKAR1A PRKAR2A PRLHR PRMT1 PRMT3 PROSER3 PRPF19 PRPF38A PRPF39 PRR20A PRR20B
    PRR20D PRR23D2 PRR5L PRRC2C PRRT1 PRSS12 PRSS48 PRSS54 PRSS55 PRSS57 PRSS58 PRSS8 PRTFDC1 PRY PSMA6 PSMA8 PSMB10
    PSMC3 PSMC3IP PSMC4 PSMC5 PSMG1 PSMG3 PTCD1 PTCH1 PTCHD3 PTCSC1 PTDSS2 PTEN PTGDR2 PTGER3 PTGS1 PTHLH PTP4A3
    PTPDC1 PTPN4 PTPRB PTPRN PTPRT PTRHD1 PTTG2 PUF60 PUM1 PURB PUS10 PUSL1 PWWP2A PWWP3A PXN PYGO2 QSOX1 R3HDM4 RAB10
    RAB12 RAB2B RAB33A RAB33B RAB3B RAB40B RAB40C RAB42 RAB5A RAB8B RABAC1 RABL2B RAD51C RAD54B RAD9B RAE1 RALB
    RALGAPA1 RAP1A RAP1BL RAP1GAP RAPGEFL1 RASGEF1A RASL10A RASL12 RASSF5 RASSF7 RAVER1 RAX2 RB1 RBL2 RBM15 RBM15B
    RBM25 RBMY1HP RBMY2TP RBPMS2 RBPMSLP RC3H2 RCAN2 RCAN3AS RCSD1 RDH13 RDX RETNLB RETSAT RFC1 RFPL2 RFWD3 RGMA RGN
    RGPD5 RGPD8 RGR RGS18 RGS3 RHAG RHEBL1 RHOV RIF1 RIIAD1 RILPL2 RIMKLB RIMS3 RIN1 RIOX1 RITA1 RLN1 RMDN1 RMND1 RND2
    RNF17 RNF26 RNF38 RNF4 RNF41 RNF7 RNPS1 RNY1 ROBO2 ROBO4 ROCR ROPN1 RPA2 RPF1 RPH3AL RPPH1 RRM1 RSPH14 RSPH4A
    RSPH6A RTCA RTL10 RTL5 RTL8A RTN2 RTN4RL2 RUFY1 RUNX1T1 RUSC2 RYBP RYK S1PR2 SACM1L SAFB2 SAGE1 SALL1 SAMMSON
    SAP30BP SARDH SAT1 SAT2 SCAF8 SCAPER SCARA3 SCARNA16 SCARNA17 SCARNA18 SCARNA2 SCARNA23 SCAT1 SCAT8 SCEL SCGB1A1
    SCGB2A1 SCGB3A2 SCLY SCN2A SCN3A SCN4B SCUBE3 SDF4 SDHAF1 SDR16C5 SDR39U1 SEC22B SEC23B SEC24B SEC31A SEC61A1
    SEC61A2 SEC61B SEC63 SELENOM SELENON SELENOP SELENOT SELENOV SEMA3C SEMA4C SEMA4D SEMA6B SEMG2 SENCR SERF2 SERINC3
    SERPINA1 SERPINA10 SERPINA6 SERPINE3 SERPINH1 SESN3 SET SETD4 SETD9 SETSIP SFI1 SFMBT2 SFTA3 SFXN4 SGPL1 SGSM2
    SH3RF1 SH3RF3 SHANK1 SHC4 SHCBP1L SHE SHISA8 SIAE SIDT1 SIL1 SIPA1L1 SLA2 SLC12A2 SLC15A2 SLC16A1 SLC17A2 SLC17A7
    SLC19A3 SLC22A18 SLC25A1 SLC25A12 SLC25A22 SLC25A24 SLC25A28 SLC25A38 SLC25A46 SLC27A3 SLC27A6 SLC28A1 SLC28A3
    SLC29A3 SLC2A13 SLC2A5 SLC30A4 SLC33A1 SLC35A1 SLC35B3 SLC35E1 SLC35F2 SLC35G3 SLC38A7 SLC38A9 SLC39A12 SLC3A2
    SLC41A1 SLC41A3 SLC43A3 SLC45A1 SLC46A1 SLC50A1 SLC52A3 SLC66A1 SLC66A3 SLC6A11 SLC6A18 SLC6A20 SLC7A11 SLC7A6OS
    SLC9A6 SLC9A9 SLC9B2 SLCO1A2 SLFN12L SLMAP SLPI SMAD9 SMARCAD1 SMCR8 SMG7 SMG9 SMIM13 SMIM15 SMIM30 SMIM31 SMIM33
    SMIM35 SMIM36 SMLR1 SMN2 SMR3A SMURF1 SNPH SNRPA SNRPB SNRPE SNRPG SNURF SNX11 SNX13 SNX16 SNX18P1Y SNX19 SNX21
    SNX6 SORCS2 SORL1 SOX30 SOX6 SPA17 SPANXA2 SPANXB1 SPANXN3 SPART SPATA17 SPATA31D4 SPATA42 SPATA6 SPATC1L SPDYE13
    SPDYE15 SPDYE2 SPDYE3 SPEM1 SPIDR SPINK5 SPINK7 SPIRE1 SPOCK3 SPRN SPRR1B SPRY2 SPTLC3 SRBD1 SRPK1 SRSF10 SRSF3
    SRSF6 SRXN1 SS18L2 SST ST3GAL2 ST8SIA1 ST8SIA2 STARD4 STARD8 STC1 STK10 STK11 STK32A STK32C STK33 STK40 STOML1
    STOX1 STOX2 STRADB STRN STRN4 STT3A STT3B STX16 STX17 STX8 SUFU SULF1 SULT1A2 SULT1C4 SULT1E1 SULT2A1 SURF2 SUSD2
    SUSD3 SUSD6 SVOPL SWT1 SYCE3 SYNDIG1 SYNGR2 SYNRG SYT9 SYTL2 SYTL3 SYTL4 SZRD1 TAAR1 TAAR2 TAAR5 TAB2 TACR2 TADA2B
    TAF11L13 TAF11L14 TAF11L4 TAF15 TAF1L TAF2 TAF6 TAFA2 TAFA3 TAGAP TAOK2 TAPBPL TAS2R20 TAS2R50 TASL TBC1D16
    TBC1D17 TBC1D24 TBC1D3F TBC1D3K TBC1D9 TBL1XR1 TBX10 TCERG1 TCIRG1 TCP10L TDO2 TDRD15 TDRD6 TDRD7 TEC TECPR1
    TEDDM1 TELO2 TENM1 TERF2 TEX13D TEX19 TEX50 TEX52 TEX53 TF TFG TGIF2LX TGM5 TGM7 TGOLN2 TH THEMIS2 TICRR TIFA
    TIMM13 TIMM44 TINAG TIPARP TKT TLE6 TLR1 TLR2 TMCO1 TMED10 TMED4 TMEFF2 TMIGD1 TMIGD2 TMOD4 TMPRSS6 TMX3 TNFRSF11A
    TNFRSF1A TNNI3 TNPO3 TOM1L2 TOMM7 TOR1A TOR2A TOR4A TOX2 TP53RK TP53TG3D TP53TG3HP TPD52L3 TPR TRA2A TRAF3 TRAF6
    TRAFD1 TRAM1L1 TRAPPC2 TRAPPC8 TRARG1 TRDD1 TREM2 TRERNA1 TREX1 TRIM22 TRIM26BP TRIM32 TRIM48 TRIM51 TRIM53BP
    TRIM58 TRIM59 TRIM60 TRIM60P5Y TRIM68 TRIM73 TRIM8 TRIM9 TRIT1 TRMT5 TRMT9B TRNT1 TRPC4 TRPC4AP TRPC7 TRPV2 TSEN34
    TSPAN18 TSPAN31 TSPAN8 TSPY10 TSPY4 TSSK3 TSSK4 TTBK1 TTC14 TTC30A TTC32 TTLL10 TTLL11 TTLL6 TTLL9 TTN TTPA TTTY11
    TTTY13 TTTY17B TTTY23 TTTY3 TTTY8 TTYH2 TUBA3E TUBAL3 TUBB2A TUBB2B TUBB3 TUBB8B TUBD1 TUBE1 TUSC3 TUSC8 TVP23C
    TXNDC17 TXNDC2 TXNRD1 TYK2 TYROBP U2SURP UBALD1 UBE2B UBE2G1 UBE2G2 UBE2K UBE2L2 UBIAD1 UBQLNL UBTD2 UBTF UBTFL10
    UBTFL8 UBXN8 UCMA UGDH UGT1A10 UGT1A7 UICLM UMODL1 UNC13A UNC93B1 UNG UPK1A UPK3B UQCR11 UQCRC2 URM1 USP17L18
    USP9Y UTP14A VASP VAV1 VAV2 VCX2 VCX3B VDAC1 VEGFC VEGFD VLDLR VMAC VPS29 VPS37B VRK1 VRTN VSIG10L VSIG2 VSTM1
    VSTM2L VSX2 VTA1 VWA5A VWC2 VWC2L VWDE WASF1 WASF3 WDR12 WDR46 WDR77 WDR83 WDR88 WDR93 WFDC5 WFDC6 WHAMM WHRN WIZ
    WNK2 WNT11 WNT3A WNT7B WT1 WTIP WWC1 WWTR1 XAGE5 XCL1 XKRX XRCC1 YBEY YTHDF2 ZACN ZBTB14 ZBTB17 ZBTB43 ZBTB49
    ZBTB8OS ZC3H12D ZC3H7B ZC3HAV1 ZCCHC13 ZDBF2 ZDHHC23 ZDHHC7 ZFP36L1 ZFYVE19 ZFYVE28 ZG16B ZIC3 ZIM2 ZMAT2 ZMIZ2
    ZMYND15 ZNHIT3 ZPR1 ZRANB2 ZRSR2 ZSCAN1 ZSCAN16 ZSCAN25 ZSCAN26 ZSCAN30 ZSCAN32 ZSCAN5B ZSWIM9 ZYG11A
    """.split()
)

#: Tissue compartments (``obs["true_zone"]``).
ZONES: tuple[str, ...] = ("epithelium", "lamina propria", "muscularis mucosae", "submucosa", "lymphoid follicle")

# --- tissue geometry, in micrometres; y grows from the lumen (top) towards the submucosa (bottom) ---
_WIDTH, _HEIGHT = 1200.0, 800.0
_MM_TOP, _MM_BOTTOM, _TISSUE_BOTTOM = 420.0, 465.0, 780.0
_CRYPT_SPACING, _CRYPT_HALF_WIDTH, _CRYPT_LUMEN = 100.0, 30.0, 5.0
_FOLLICLE = (850.0, 500.0, 170.0, 140.0)  # centre x, centre y, radius x, radius y
_PIXEL_SIZE = 1.2  # micrometres per image pixel
#: Cells per 1.2 mm x 0.8 mm tile (about 4,000 per mm², as in a real section); more cells, more tiles.
_CELLS_PER_TILE = 4000
_MAX_SINGLE_SCALE = 4096  # pixels on the longer side above which the image is multiscale

#: Relative cell density of each zone (the follicle is packed, the submucosa loose).
_ZONE_DENSITY = {
    "epithelium": 2.0,
    "lamina propria": 1.0,
    "muscularis mucosae": 1.2,
    "submucosa": 0.35,
    "lymphoid follicle": 2.2,
}

_T4, _T8 = "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"

#: Type composition of the non-epithelial zones (the epithelium's depends on the position along the crypt axis).
_ZONE_TYPES: dict[str, dict[str, float]] = {
    "lamina propria": {
        "plasma cell": 0.30,
        "fibroblast": 0.20,
        "macrophage": 0.14,
        _T4: 0.14,
        _T8: 0.07,
        "B cell": 0.03,
        "endothelial cell": 0.10,
        "smooth muscle cell": 0.02,
    },
    "muscularis mucosae": {
        "smooth muscle cell": 0.85,
        "fibroblast": 0.07,
        "endothelial cell": 0.04,
        "macrophage": 0.04,
    },
    "submucosa": {
        "fibroblast": 0.55,
        "macrophage": 0.12,
        "endothelial cell": 0.08,
        _T4: 0.07,
        _T8: 0.04,
        "plasma cell": 0.06,
        "smooth muscle cell": 0.05,
        "B cell": 0.03,
    },
    "follicle core": {"B cell": 0.86, _T4: 0.07, "macrophage": 0.05, "fibroblast": 0.02},
    "follicle rim": {_T4: 0.55, _T8: 0.15, "B cell": 0.18, "endothelial cell": 0.06, "macrophage": 0.06},
    "vessel wall": {"endothelial cell": 1.0},
    "vessel media": {"smooth muscle cell": 0.9, "fibroblast": 0.1},
}

#: Cell radius (micrometres) of each type: shapes, nuclei in the image, and the cell's share of transcripts.
_RADIUS = {
    "enterocyte": 6.0,
    "goblet cell": 6.5,
    "intestinal crypt stem cell": 5.0,
    "plasma cell": 5.0,
    "B cell": 4.0,
    _T4: 4.0,
    _T8: 4.0,
    "macrophage": 7.0,
    "fibroblast": 6.0,
    "endothelial cell": 5.0,
    "smooth muscle cell": 6.0,
}

#: Cell-type composition of the whole-tissue reference and each source's enrichment (immune vs epithelial sorts).
_REFERENCE_PROPORTIONS = {
    "enterocyte": 0.16,
    "goblet cell": 0.10,
    "intestinal crypt stem cell": 0.06,
    "plasma cell": 0.14,
    "B cell": 0.08,
    _T4: 0.10,
    _T8: 0.07,
    "macrophage": 0.07,
    "fibroblast": 0.09,
    "endothelial cell": 0.05,
    "smooth muscle cell": 0.04,
    "mast cell": 0.02,
    "enteroendocrine cell": 0.02,
}
_SOURCES = {
    # name: (share of cells, median total counts, enrichment of immune, epithelial, stromal types)
    "atlas_A": (0.55, 3000.0, (2.0, 1.0, 1.0)),
    "atlas_B": (0.45, 1500.0, (1.0, 2.0, 1.0)),
}
_SPATIAL_MEDIAN_COUNTS = 200.0
_MARKER_LEVEL = (3.0, 0.5)  # mean and sd of a marker's log level in its own type
_MARKER_OFFSET = (3.5, 5.5)  # range of its log-fold drop in the other types
_SIBLING_OFFSET = (1.5, 3.5)  # ... and in the other types of its lineage (markers are graded, not binary)
_LINEAGES = (
    ("enterocyte", "goblet cell", "intestinal crypt stem cell", "enteroendocrine cell"),
    ("B cell", "plasma cell"),
    (_T4, _T8),
    ("fibroblast", "smooth muscle cell"),
    ("macrophage", "mast cell"),
)
_TRANSITION = 0.4  # most a crypt cell's expression leans towards the stem (or mature) profile near the transition
_DONOR_SHIFT = 0.25  # sd of the per-type, per-gene log difference between the section's donor and the reference
_SPILLOVER = (1.0, 6.0)  # beta distribution of the share of a cell's transcripts from its neighbours
_MISSING_FROM_REFERENCE = 0.07  # share of panel genes (only among the "other" genes) the reference lacks


def demo(
    *,
    n_cells: int = 4000,
    n_genes: int = 300,
    n_reference_cells: int = 6000,
    n_reference_genes: int = 2000,
    random_state: int | np.random.Generator | None = 0,
    image: bool = True,
) -> tuple[SpatialData, AnnData]:
    """Make a synthetic colon-mucosa spatial dataset and a labelled scRNA-seq reference.

    Nothing is downloaded: the data are simulated, fast (a couple of seconds for the defaults) and fully seeded.
    The tissue (1.2 mm x 0.8 mm for up to about 6,000 cells) has crypts with stem cells at their base and goblet
    cells and enterocytes above, lamina propria rich in plasma cells between them, the muscularis mucosae, a
    submucosa with blood vessels, and an isolated lymphoid follicle (B-cell core, T-cell rim). The 11 cell types
    carry exact Cell Ontology labels and express real human marker genes (e.g. ``LGR5``, ``MUC2``, ``MS4A1``) over
    shared programmes, housekeeping genes and a background, with counts drawn from a gamma-Poisson (negative
    binomial) model.
    More cells make a larger section, not a denser one: every 4,000 cells add a 1.2 mm x 0.8 mm strip of mucosa
    (its own follicle and vessels), the strips laid side by side in rows, so that cells stay about 7 µm apart as in
    real tissue (a million cells cover about 19 mm x 13 mm, a few minutes and a few GB of memory).

    The reference is deeper (about 5-10x the spatial counts per cell) and spans more genes, though not the whole panel:
    it lacks about 7 % of the panel's genes (21 of the default 300; none of them a marker, programme or housekeeping
    gene), as a real reference often does (genes filtered out or renamed before it was shared), so
    :func:`spatialcx.tl.annotate` on the demo warns that those panel genes are missing from the reference and trains on
    the shared ones: that warning is expected. It has a per-gene platform bias against the panel, comes from two sources
    (``"atlas_A"``: immune-enriched and deep; ``"atlas_B"``: epithelium-enriched and shallower) and holds two types the
    section lacks (``"mast cell"``, ``"enteroendocrine cell"``). The section's cells carry what makes real annotation
    imperfect: segmentation bleed-through from neighbours, transit-amplifying cells between stem and mature epithelium,
    and a donor difference from the reference.

    Parameters
    ----------
    n_cells
        Number of cells in the tissue section; the section grows with it (see above). At least 50; below a few
        hundred cells, a rare cell type or compartment may be missing from the section.
    n_genes
        Number of genes on the spatial panel (all markers, programme and housekeeping genes, then others). At least
        the number of those required genes.
    n_reference_cells
        Number of cells in the reference. At least 10 per cell type (130); every type has cells in both sources.
    n_reference_genes
        Number of genes in the reference: at least the panel genes it shares, at most those plus the demo's other
        gene symbols (an error names the range for the chosen panel).
    random_state
        Seed (a non-negative integer, or a generator) of everything random: layout, expression profiles, counts
        and image. The same seed gives identical data; ``None`` draws fresh entropy.
    image
        Whether to render a two-channel (``"DAPI"``, ``"18S"``) uint8 image of the section (1000 x 667 px at 1.2 µm
        per pixel for the default section, placed in microns by a scale transformation; multiscale and chunked
        when longer than 4096 px on a side).

    Returns
    -------
    ``(sdata, reference)``.

    ``sdata`` is a :class:`~spatialdata.SpatialData` with

    - ``images["image"]``: ``(c, y, x)`` uint8 image (when ``image=True``), ``Scale`` to the ``"global"`` microns
      (a multiscale ``DataTree`` for a large section);
    - ``shapes["cells"]``: circles (``radius`` in µm) indexed by the instance ids;
    - ``tables["table"]``: raw integer counts in ``X`` (CSR, float32); ``obs["region"]`` (``"cells"``),
      ``obs["instance_id"]``, the ground truth ``obs["true_cell_type"]`` and ``obs["true_zone"]``;
      ``obsm["spatial"]``: centroids in µm. It annotates ``"cells"``.

    ``reference`` is an :class:`~anndata.AnnData` with raw integer counts in ``X`` (CSR, float32), gene symbols as
    ``var_names``, ``obs["cell_type"]`` (CL labels), ``obs["cell_type_ontology_term_id"]`` and ``obs["source"]``.

    Examples
    --------
    >>> import spatialcx as scx
    >>> sdata, reference = scx.datasets.demo()
    >>> sdata["table"].obs["true_cell_type"].value_counts()  # doctest: +SKIP
    """
    _check_int(n_cells, "n_cells", minimum=MIN_CELLS, why="a smaller section is too sparse to show its tissue")
    _check_int(
        n_reference_cells,
        "n_reference_cells",
        minimum=10 * len(CELL_TYPES),
        why=f"10 for each of its {len(CELL_TYPES)} cell types",
    )
    required = _required_genes()
    _check_int(n_genes, "n_genes", minimum=len(required), why="the marker, programme and housekeeping genes")
    _check_int(n_reference_genes, "n_reference_genes")  # its range depends on the panel: checked with the genes
    if not isinstance(image, bool | np.bool_):
        raise TypeError(f"`image` must be True or False, got {image!r} ({type(image).__name__}).")

    seeds = _seed_sequence(random_state).spawn(5)
    gene_rng, tissue_rng, spatial_rng, reference_rng, image_rng = (np.random.default_rng(s) for s in seeds)

    panel, reference_genes = _choose_genes(gene_rng, required, n_genes, n_reference_genes)
    universe = sorted(set(panel) | set(reference_genes))
    log_profiles = _log_profiles(gene_rng, universe)  # types x universe
    gene_pos = pd.Index(universe)

    # --- tissue section ---
    xy, zone, cell_types, crypt_depth, section = _layout(tissue_rng, n_cells)
    radius = np.array([_RADIUS[t] for t in SPATIAL_CELL_TYPES])[cell_types] * tissue_rng.uniform(0.85, 1.15, n_cells)
    panel_idx = gene_pos.get_indexer(panel)
    platform_bias = np.exp(gene_rng.normal(0.0, 0.5, len(panel)))
    spatial_counts = _spatial_counts(
        spatial_rng, xy, cell_types, crypt_depth, radius, log_profiles[:, panel_idx], platform_bias
    )

    # --- reference ---
    ref_idx = gene_pos.get_indexer(reference_genes)
    ref_counts, ref_types, ref_sources = _reference_counts(reference_rng, n_reference_cells, log_profiles[:, ref_idx])

    # --- assemble (validation and simulation are done; nothing below can fail on the inputs) ---
    sdata = _assemble_spatialdata(
        xy, zone, cell_types, radius, spatial_counts, panel, section, image_rng if image else None
    )
    all_types = list(CELL_TYPES)
    ref_obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(ref_types, categories=all_types),
            "cell_type_ontology_term_id": pd.Categorical.from_codes(
                ref_types, categories=[CELL_TYPES[t] for t in all_types]
            ),
            "source": pd.Categorical.from_codes(ref_sources, categories=list(_SOURCES)),
        },
        index=pd.Index([f"ref_{i}" for i in range(n_reference_cells)]),
    )
    reference = AnnData(X=ref_counts, obs=ref_obs, var=pd.DataFrame(index=pd.Index(reference_genes)))
    logger.info(
        "demo: %d cells x %d panel genes; reference %d cells x %d genes (%d shared)",
        n_cells,
        len(panel),
        n_reference_cells,
        len(reference_genes),
        len(set(panel) & set(reference_genes)),
    )
    return sdata, reference


# ----------------------------------------------------------------------------------------------------------------------
# inputs

#: Fewest cells of a demo slide (below a few hundred cells, a rare type or compartment may still be missing).
MIN_CELLS = 50


def _check_int(value: object, name: str, *, minimum: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise ValueError(
            f"`{name}` is {value}, but the demo needs at least {minimum} ({why}). Pass `{name}={minimum}` or more."
        )


def _seed_sequence(random_state: int | np.random.Generator | None) -> np.random.SeedSequence:
    if isinstance(random_state, np.random.Generator):
        return np.random.SeedSequence(random_state.integers(0, 2**63))
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int | np.integer)):
        raise TypeError(f"`random_state` must be an int, a numpy Generator or None, got {random_state!r}.")
    if random_state is not None and random_state < 0:
        raise ValueError(f"`random_state` must be a non-negative integer seed (e.g. 0), got {random_state}.")
    return np.random.SeedSequence(random_state)


def _required_genes() -> list[str]:
    """Markers, programme and housekeeping genes: always on the panel, in a fixed order, without duplicates."""
    genes = [g for markers in MARKERS.values() for g in markers]
    genes += [g for programme_genes, _ in PROGRAMS.values() for g in programme_genes]
    genes += list(HOUSEKEEPING_GENES)
    return list(dict.fromkeys(genes))


def _choose_genes(
    rng: np.random.Generator, required: list[str], n_genes: int, n_reference_genes: int
) -> tuple[list[str], list[str]]:
    """Pick the panel and the reference genes (sorted symbols); the reference misses a few non-marker panel genes."""
    taken = set(required)
    extra = [g for g in _PANEL_EXTRA if g not in taken]
    background = [g for g in _BACKGROUND_GENES if g not in taken and g not in set(extra)]
    pool = [extra[i] for i in rng.permutation(len(extra))] + [background[i] for i in rng.permutation(len(background))]
    if n_genes - len(required) > len(pool):
        raise ValueError(
            f"`n_genes` is {n_genes}, but the demo knows only {len(required) + len(pool)} gene symbols. "
            f"Pass `n_genes={len(required) + len(pool)}` or fewer."
        )
    panel_other = pool[: n_genes - len(required)]
    rest = pool[n_genes - len(required) :]

    # the reference lacks a few of the panel's other genes (never a marker, programme or housekeeping gene)
    n_missing = min(round(_MISSING_FROM_REFERENCE * n_genes), len(panel_other))
    missing = {panel_other[i] for i in rng.choice(len(panel_other), n_missing, replace=False)}
    shared = [g for g in required + panel_other if g not in missing]
    if not len(shared) <= n_reference_genes <= len(shared) + len(rest):
        raise ValueError(
            f"`n_reference_genes` is {n_reference_genes}, but with a {n_genes}-gene panel the reference holds the "
            f"{len(shared)} panel genes it shares plus at most {len(rest)} others. "
            f"Pass `n_reference_genes` between {len(shared)} and {len(shared) + len(rest)}."
        )
    # the reference's own genes: the remaining curated genes first, then background genes
    reference = shared + rest[: n_reference_genes - len(shared)]
    return sorted(required + panel_other), sorted(reference)


# ----------------------------------------------------------------------------------------------------------------------
# expression


def _log_profiles(rng: np.random.Generator, genes: list[str]) -> np.ndarray:
    """Natural-log mean expression (relative units) of every type (rows, :data:`CELL_TYPES` order) and gene."""
    types = list(CELL_TYPES)
    n_types, n_genes = len(types), len(genes)
    col = {g: j for j, g in enumerate(genes)}
    row = {t: i for i, t in enumerate(types)}
    curated = set(_PANEL_EXTRA)

    # background: low, with a small type-specific wobble; the curated panel genes a little higher and more specific
    is_curated = np.array([g in curated for g in genes])
    base = np.where(is_curated, rng.normal(-0.5, 1.0, n_genes), rng.normal(-2.5, 1.5, n_genes))
    wobble = np.where(is_curated, 0.5, 0.3)
    log_mu = base[None, :] + rng.normal(0.0, 1.0, (n_types, n_genes)) * wobble[None, :]

    hk = [col[g] for g in HOUSEKEEPING_GENES if g in col]
    log_mu[:, hk] = rng.normal(3.5, 0.5, len(hk))[None, :] + rng.normal(0.0, 0.1, (n_types, len(hk)))

    for genes_, members in PROGRAMS.values():
        idx = [col[g] for g in genes_ if g in col]
        level = rng.normal(2.2, 0.4, len(idx))
        off = rng.uniform(3.0, 5.0, len(idx))
        log_mu[:, idx] = level[None, :] - off[None, :] + rng.normal(0.0, 0.2, (n_types, len(idx)))
        for t, shift in members.items():
            log_mu[row[t], idx] = level + shift + rng.normal(0.0, 0.2, len(idx))

    for t, markers in MARKERS.items():
        idx = [col[g] for g in markers if g in col]
        level = rng.normal(*_MARKER_LEVEL, len(idx))
        off = rng.uniform(*_MARKER_OFFSET, (n_types, len(idx)))
        related = [row[u] for u in _related(t)]
        off[related] = rng.uniform(*_SIBLING_OFFSET, (len(related), len(idx)))
        log_mu[:, idx] = level[None, :] - off
        log_mu[row[t], idx] = level
    # well-known cross-expression: human macrophages carry some CD4, plasma cells some CD79A
    for gene, t, shift in (("CD4", "macrophage", -1.5), ("CD79A", "plasma cell", -1.5)):
        if gene in col:
            log_mu[row[t], col[gene]] = log_mu[row[_owner(gene)], col[gene]] + shift
    return log_mu


def _related(cell_type: str) -> list[str]:
    """The other types of the same lineage: they share a marker at a lower level."""
    for lineage in _LINEAGES:
        if cell_type in lineage:
            return [t for t in lineage if t != cell_type]
    return []


def _owner(gene: str) -> str:
    return next(t for t, markers in MARKERS.items() if gene in markers)


def _gamma_poisson(
    rng: np.random.Generator,
    mean_of: Callable[[int, int], np.ndarray],
    n_rows: int,
    dispersion: np.ndarray,
    *,
    chunk_size: int = 500,
) -> sp.csr_matrix:
    """Negative binomial counts with per-gene dispersion, as float32 CSR.

    ``mean_of(start, stop)`` gives the means (cells x genes) of rows ``start:stop``: only a few hundred cells' means
    exist at a time, so memory stays O(chunk) however many cells. Drawn as Poisson(mean * Gamma(1 / dispersion,
    dispersion)).
    """
    shape, scale = 1.0 / dispersion, dispersion
    blocks = []
    for start in range(0, n_rows, chunk_size):
        block = mean_of(start, min(start + chunk_size, n_rows))
        rate = rng.gamma(shape, scale, size=block.shape)
        rate *= block
        counts = rng.poisson(rate)
        rows, cols = np.nonzero(counts)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=block.shape[0]))])
        blocks.append(sp.csr_matrix((counts[rows, cols].astype(np.float32), cols, indptr), shape=block.shape))
    if not blocks:
        return sp.csr_matrix((0, len(dispersion)), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def _spatial_counts(
    rng: np.random.Generator,
    xy: np.ndarray,
    cell_types: np.ndarray,
    crypt_depth: np.ndarray,
    radius: np.ndarray,
    log_profiles: np.ndarray,
    platform_bias: np.ndarray,
) -> sp.csr_matrix:
    """Panel counts of the section's cells.

    Each cell's expression mixes its type's profile with (a) the stem profile or a mature one along the crypt axis
    (transit-amplifying cells in between are neither), and (b) its neighbours' profiles (segmentation bleed-through).
    The section's donor differs from the reference's by a small per-type, per-gene shift; the platform by a per-gene
    detection bias.
    """
    from scipy.spatial import cKDTree

    n, n_types = len(xy), len(SPATIAL_CELL_TYPES)
    donor = rng.normal(0.0, _DONOR_SHIFT, (n_types, log_profiles.shape[1]))
    profiles = np.exp(log_profiles[:n_types] + donor) * platform_bias[None, :]
    profiles /= profiles.sum(axis=1, keepdims=True)

    own = np.zeros((n, n_types))
    own[np.arange(n), cell_types] = 1.0
    index = {t: i for i, t in enumerate(SPATIAL_CELL_TYPES)}
    stem, enterocyte = index["intestinal crypt stem cell"], index["enterocyte"]
    mature = np.isin(cell_types, [enterocyte, index["goblet cell"]])
    share = np.where(
        mature,
        _TRANSITION * np.clip((crypt_depth - 0.6) / 0.25, 0.0, 1.0),
        np.where(cell_types == stem, _TRANSITION * np.clip((0.85 - crypt_depth) / 0.15, 0.0, 1.0), 0.0),
    )
    partner = np.where(mature, stem, enterocyte)
    own *= (1.0 - share)[:, None]
    own[np.arange(n), partner] += share * (mature | (cell_types == stem))

    # bleed-through from the two nearest cells: small for most cells, large for a few badly segmented ones
    k = min(2, n - 1)
    _, nn = cKDTree(xy).query(xy, k=k + 1)
    spill = rng.beta(*_SPILLOVER, n)[:, None]
    size = (radius / 5.0) ** 2
    library = _SPATIAL_MEDIAN_COUNTS * size * np.exp(rng.normal(0.0, 0.4, n))
    dispersion = np.exp(rng.normal(np.log(0.1), 0.4, profiles.shape[1]))

    def mean_of(start: int, stop: int) -> np.ndarray:
        s = spill[start:stop]
        mixture = (1.0 - s) * own[start:stop] + s * own[nn[start:stop, 1:]].mean(axis=1)
        return (mixture @ profiles) * library[start:stop, None]

    return _gamma_poisson(rng, mean_of, n, dispersion)


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainder), at least one each."""
    share = weights / weights.sum() * n
    parts = np.maximum(np.floor(share).astype(int), 1)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while parts.sum() < n:
        parts[order[i % len(parts)]] += 1
        i += 1
    while parts.sum() > n:
        parts[np.argmax(parts)] -= 1
    return parts


def _reference_counts(
    rng: np.random.Generator, n_cells: int, log_profiles: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    types = list(CELL_TYPES)
    group = np.array([0 if t in _IMMUNE else 1 if t in _EPITHELIAL else 2 for t in types])
    base = np.array([_REFERENCE_PROPORTIONS[t] for t in types])
    per_source = _allocate(n_cells, np.array([share for share, _, _ in _SOURCES.values()]))
    type_codes, source_codes, library = [], [], []
    for s, (n_s, (_, depth, enrichment)) in enumerate(zip(per_source, _SOURCES.values())):
        counts = _allocate(int(n_s), base * np.asarray(enrichment)[group])
        type_codes.append(np.repeat(np.arange(len(types)), counts))
        source_codes.append(np.full(int(n_s), s))
        library.append(depth * np.exp(rng.normal(0.0, 0.4, int(n_s))))
    order = rng.permutation(n_cells)
    type_codes_ = np.concatenate(type_codes)[order]
    source_codes_ = np.concatenate(source_codes)[order]
    library_ = np.concatenate(library)[order]

    n_genes = log_profiles.shape[1]
    batch = np.exp(rng.normal(0.0, 0.15, (len(_SOURCES), 1, n_genes)))  # per-source, per-gene bias
    profiles = np.exp(log_profiles)[None, :, :] * batch  # sources x types x genes
    profiles /= profiles.sum(axis=2, keepdims=True)
    dispersion = np.exp(rng.normal(np.log(0.3), 0.4, n_genes))

    def mean_of(start: int, stop: int) -> np.ndarray:
        mean = profiles[source_codes_[start:stop], type_codes_[start:stop]]
        mean *= library_[start:stop, None]
        return mean

    counts = _gamma_poisson(rng, mean_of, n_cells, dispersion)
    return counts, type_codes_, source_codes_


# ----------------------------------------------------------------------------------------------------------------------
# tissue layout


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class _Section:
    """The section: ``n_tiles`` tiles of ``_WIDTH`` x ``_HEIGHT`` µm in rows of ``n_cols``.

    Each tile has its own follicle and vessels (tile-local coordinates). One tile holds about :data:`_CELLS_PER_TILE`
    cells, so cell density stays that of a real section however many cells are asked for; larger sections are strips of
    mucosa side by side in rows.
    """

    n_tiles: int
    n_cols: int
    follicles: tuple[tuple[float, float, float, float], ...]
    vessels: tuple[np.ndarray, ...]

    @property
    def n_rows(self) -> int:
        return -(-self.n_tiles // self.n_cols)

    @property
    def width(self) -> float:
        return min(self.n_tiles, self.n_cols) * _WIDTH

    @property
    def height(self) -> float:
        return self.n_rows * _HEIGHT


def _section(rng: np.random.Generator, n_cells: int) -> _Section:
    n_tiles = max(1, round(n_cells / _CELLS_PER_TILE))
    n_cols = int(np.ceil(np.sqrt(n_tiles)))
    follicles = [_FOLLICLE]
    vessels = [_vessels(rng, _FOLLICLE)]
    for _ in range(1, n_tiles):
        follicle = (float(rng.uniform(300.0, _WIDTH - 300.0)), *_FOLLICLE[1:])
        follicles.append(follicle)
        vessels.append(_vessels(rng, follicle))
    return _Section(n_tiles, n_cols, tuple(follicles), tuple(vessels))


def _vessels(rng: np.random.Generator, follicle: tuple[float, float, float, float]) -> np.ndarray:
    """Blood vessels of the submucosa: rows of (x, y, lumen radius), away from the follicle and each other."""
    cx, cy, rx, ry = follicle
    out: list[tuple[float, float, float]] = []
    for _ in range(500):
        x, y = rng.uniform(50, _WIDTH - 50), rng.uniform(_MM_BOTTOM + 60, _TISSUE_BOTTOM - 50)
        r = rng.uniform(10, 30)
        if ((x - cx) / (rx + 60)) ** 2 + ((y - cy) / (ry + 60)) ** 2 < 1:
            continue
        if any(np.hypot(x - a, y - b) < r + c + 60 for a, b, c in out):
            continue
        out.append((x, y, r))
        if len(out) == 5:
            break
    return np.array(out).reshape(-1, 3)


def _tile_of(x: np.ndarray, y: np.ndarray, section: _Section) -> np.ndarray:
    col = np.clip(np.floor(x / _WIDTH), 0, section.n_cols - 1).astype(np.int64)
    row = np.clip(np.floor(y / _HEIGHT), 0, section.n_rows - 1).astype(np.int64)
    return row * section.n_cols + col


def _per_tile(
    x: np.ndarray,
    y: np.ndarray,
    section: _Section,
    fn: Callable[[dict[str, np.ndarray]], np.ndarray],
    tile: np.ndarray | None = None,
) -> np.ndarray:
    """``fn`` of the zone weights of points (µm), tile by tile (memory O(tile)); zeros where no tissue tile lies.

    ``tile`` assigns the points to tiles (default: the tile they lie in), e.g. jittered points to their cell's tile.
    """
    if section.n_tiles == 1:
        return fn(_zone_weights(x, y, section.vessels[0], section.follicles[0]))
    tile = _tile_of(x, y, section) if tile is None else tile
    order = np.argsort(tile, kind="stable")
    bounds = np.searchsorted(tile[order], np.arange(section.n_tiles + 1))
    out: np.ndarray | None = None
    for t in range(section.n_tiles):
        idx = order[bounds[t] : bounds[t + 1]]
        if idx.size == 0:
            continue
        row, col = divmod(t, section.n_cols)
        w = _zone_weights(
            x[idx] - col * _WIDTH,
            y[idx] - row * _HEIGHT,
            section.vessels[t],
            section.follicles[t],
            x_offset=col * _WIDTH,
        )
        value = fn(w)
        if out is None:
            out = np.zeros((len(x), *value.shape[1:]), dtype=value.dtype)
        out[idx] = value
    if out is None:  # no point on any tile
        value = fn(_zone_weights(np.zeros(0), np.zeros(0), section.vessels[0], section.follicles[0]))
        out = np.zeros((len(x), *value.shape[1:]), dtype=value.dtype)
    return out


def _zone_weights(
    x: np.ndarray,
    y: np.ndarray,
    vessels: np.ndarray,
    follicle: tuple[float, float, float, float],
    *,
    x_offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """Soft membership (0-1) of points (tile-local µm) in each compartment; borders are a few micrometres wide.

    ``x_offset`` is the tile's position along its row: the surface and the crypts continue across the tiles of a row.
    """
    surface = 40.0 + 8.0 * np.sin(2 * np.pi * (x + x_offset) / 350.0)
    crypt_base = surface + 360.0
    below_surface = _sigmoid((y - surface) / 3.0)
    mucosa = below_surface * _sigmoid((_MM_TOP - y) / 4.0)
    muscularis = _sigmoid((y - _MM_TOP) / 4.0) * _sigmoid((_MM_BOTTOM - y) / 4.0)
    submucosa = _sigmoid((y - _MM_BOTTOM) / 4.0) * _sigmoid((_TISSUE_BOTTOM - y) / 4.0)

    d = np.abs((x - _CRYPT_SPACING / 2) % _CRYPT_SPACING - _CRYPT_SPACING / 2)  # distance to the nearest crypt axis
    in_crypt = _sigmoid((crypt_base - y) / 6.0)
    crypt_lumen = _sigmoid((_CRYPT_LUMEN - d) / 1.5) * in_crypt
    crypt_wall = _sigmoid((_CRYPT_HALF_WIDTH - d) / 3.0) * _sigmoid((d - _CRYPT_LUMEN) / 1.5) * in_crypt
    surface_layer = _sigmoid((surface + 14.0 - y) / 3.0)
    epithelium = mucosa * np.maximum(crypt_wall, surface_layer * (1.0 - crypt_lumen))
    lamina = mucosa * np.clip(1.0 - np.maximum(crypt_wall, surface_layer) - crypt_lumen, 0.0, 1.0)

    cx, cy, rx, ry = follicle
    rho = np.hypot((x - cx) / rx, (y - cy) / ry)
    follicle = _sigmoid((1.0 - rho) / 0.05) * below_surface
    core = _sigmoid((0.62 - rho) / 0.05) * below_surface

    wall = np.zeros_like(x)
    media = np.zeros_like(x)
    lumen = np.zeros_like(x)
    for vx, vy, r in vessels:
        dv = np.hypot(x - vx, y - vy)
        lumen = np.maximum(lumen, _sigmoid((r - dv) / 1.5))
        wall = np.maximum(wall, _sigmoid((r + 7.0 - dv) / 2.0) * _sigmoid((dv - r) / 1.5))
        if r > 18:  # arteries and veins with a smooth-muscle media
            media = np.maximum(media, _sigmoid((r + 22.0 - dv) / 3.0) * _sigmoid((dv - r - 7.0) / 2.0))
    outside_follicle = 1.0 - follicle
    return {
        "epithelium": epithelium * outside_follicle,
        "lamina propria": lamina * outside_follicle,
        "muscularis mucosae": muscularis * outside_follicle,
        "submucosa": submucosa * outside_follicle * np.clip(1.0 - wall - media - lumen, 0.0, 1.0),
        "vessel wall": submucosa * outside_follicle * wall,
        "vessel media": submucosa * outside_follicle * media,
        "follicle core": core,
        "follicle rim": follicle - core,
        "_crypt_depth": np.clip((y - surface) / (crypt_base - surface), 0.0, 1.0),
    }


def _type_probabilities(w: dict[str, np.ndarray]) -> np.ndarray:
    """Cells x types probabilities mixing the compartments' compositions by membership."""
    n = len(w["epithelium"])
    index = {t: i for i, t in enumerate(SPATIAL_CELL_TYPES)}
    prob = np.zeros((n, len(SPATIAL_CELL_TYPES)))
    depth = w["_crypt_depth"]
    stem = _sigmoid((depth - 0.85) / 0.03)
    goblet = 0.2 + 0.2 * _sigmoid((depth - 0.3) / 0.08)
    epi = w["epithelium"]
    prob[:, index["intestinal crypt stem cell"]] += epi * 0.97 * stem
    prob[:, index["goblet cell"]] += epi * 0.97 * (1.0 - stem) * goblet
    prob[:, index["enterocyte"]] += epi * 0.97 * (1.0 - stem) * (1.0 - goblet)
    prob[:, index[_T8]] += epi * 0.03  # intraepithelial lymphocytes
    for zone, composition in _ZONE_TYPES.items():
        for t, p in composition.items():
            prob[:, index[t]] += w[zone] * p
    return prob


def _density(w: dict[str, np.ndarray]) -> np.ndarray:
    follicle = w["follicle core"] + w["follicle rim"]
    return (
        _ZONE_DENSITY["epithelium"] * w["epithelium"]
        + _ZONE_DENSITY["lamina propria"] * w["lamina propria"]
        + _ZONE_DENSITY["muscularis mucosae"] * w["muscularis mucosae"]
        + _ZONE_DENSITY["submucosa"] * w["submucosa"]
        + 1.2 * (w["vessel wall"] + w["vessel media"])
        + _ZONE_DENSITY["lymphoid follicle"] * follicle
    )


def _zone_of(w: dict[str, np.ndarray]) -> np.ndarray:
    stacked = np.stack(
        [
            w["epithelium"],
            w["lamina propria"],
            w["muscularis mucosae"],
            w["submucosa"] + w["vessel wall"] + w["vessel media"],
            w["follicle core"] + w["follicle rim"],
        ]
    )
    return stacked.argmax(axis=0)


def _layout(rng: np.random.Generator, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, _Section]:
    """Cell centroids (µm), zone codes, type codes, crypt depth (0 surface, 1 base) and the section.

    Positions are sampled from the zones' densities, types from their compositions.
    """
    section = _section(rng, n_cells)
    # candidates on a jittered grid, about five per cell; keep n_cells of them weighted by the local density
    step = np.sqrt(_WIDTH * _HEIGHT * section.n_tiles * 0.8 / (5.0 * n_cells))
    gx, gy = np.meshgrid(np.arange(step / 2, section.width, step), np.arange(step / 2, section.height, step))
    x = gx.ravel() + rng.uniform(-0.35, 0.35, gx.size) * step
    y = gy.ravel() + rng.uniform(-0.35, 0.35, gx.size) * step
    del gx, gy
    density = _per_tile(x, y, section, _density)
    keep = (density > 0.05) & (x >= 0) & (x < section.width) & (y >= 0) & (y < section.height)
    x, y, density = x[keep], y[keep], density[keep]
    if len(x) < n_cells:  # pragma: no cover - the grid is sized for about five candidates per cell
        raise RuntimeError(f"only {len(x)} candidate positions for {n_cells} cells")
    # weighted sampling without replacement (Gumbel top-k), then order cells top-to-bottom, left-to-right
    keys = np.log(density) + rng.gumbel(size=len(x))
    chosen = np.argpartition(-keys, n_cells - 1)[:n_cells]
    chosen = chosen[np.lexsort((x[chosen], np.round(y[chosen], 1)))]
    x, y = x[chosen], y[chosen]

    # types come from the zone memberships at a slightly jittered position: cells mix across borders
    jx, jy = x + rng.normal(0.0, 4.0, n_cells), y + rng.normal(0.0, 4.0, n_cells)
    tile = _tile_of(x, y, section)
    jittered = _per_tile(
        jx, jy, section, lambda w: np.column_stack([_type_probabilities(w), w["_crypt_depth"]]), tile=tile
    )
    prob, crypt_depth = jittered[:, :-1], jittered[:, -1]
    prob /= prob.sum(axis=1, keepdims=True)
    u = rng.uniform(size=(n_cells, 1))
    cell_types = np.minimum((prob.cumsum(axis=1) < u).sum(axis=1), len(SPATIAL_CELL_TYPES) - 1)
    zone = _per_tile(x, y, section, _zone_of, tile=tile)
    return np.column_stack([x, y]), zone, cell_types, crypt_depth, section


# ----------------------------------------------------------------------------------------------------------------------
# SpatialData


def _render_image(rng: np.random.Generator, xy: np.ndarray, cell_types: np.ndarray, section: _Section) -> np.ndarray:
    """A ``(2, y, x)`` uint8 image: DAPI (nuclei) and 18S (cytoplasm) over tissue autofluorescence.

    Rendered tile by tile (with a margin, so that blobs and blur cross the seams), in memory O(tile) besides the image.
    """
    from scipy.ndimage import gaussian_filter

    ny, nx = int(np.ceil(section.height / _PIXEL_SIZE)), int(np.ceil(section.width / _PIXEL_SIZE))
    out = np.empty((2, ny, nx), dtype=np.uint8)

    # nucleus radius (µm) and brightness: lymphocytes and plasma cells small and dense, macrophages pale
    nucleus = {"B cell": (2.8, 1.0), _T4: (2.8, 1.0), _T8: (2.8, 1.0), "plasma cell": (3.0, 0.9)}
    nucleus |= {"macrophage": (3.8, 0.55), "fibroblast": (3.0, 0.6), "smooth muscle cell": (3.0, 0.6)}
    nucleus_radius, brightness = np.array([nucleus.get(t, (3.3, 0.75)) for t in SPATIAL_CELL_TYPES]).T
    cell_radius = np.array([_RADIUS[t] for t in SPATIAL_CELL_TYPES])
    cytoplasm_peak = np.array([120.0 if t in _EPITHELIAL else 70.0 for t in SPATIAL_CELL_TYPES])
    cell_row = np.clip((xy[:, 1] / _PIXEL_SIZE).astype(int), 0, ny - 1)
    cell_col = np.clip((xy[:, 0] / _PIXEL_SIZE).astype(int), 0, nx - 1)

    margin = 32  # pixels: more than the widest blob (3 sigma of a 7 µm cell) and the background blur
    row_edges = np.unique(np.r_[np.round(np.arange(section.n_rows) * _HEIGHT / _PIXEL_SIZE).astype(int), ny])
    col_edges = np.unique(np.r_[np.round(np.arange(section.n_cols) * _WIDTH / _PIXEL_SIZE).astype(int), nx])
    for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True):
        for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True):
            # the rendered window: the tile and a margin, starting on the 4-pixel background grid
            ya, yb = max(0, (r0 - margin) // 4 * 4), min(ny, r1 + margin)
            xa, xb = max(0, (c0 - margin) // 4 * 4), min(nx, c1 + margin)
            h, w = yb - ya, xb - xa
            # tissue background from the compartments, on a 4x coarser grid then upsampled
            cy, cx = np.meshgrid(np.arange(ya, yb, 4) + 2.0, np.arange(xa, xb, 4) + 2.0, indexing="ij")
            tissue = _per_tile(cx.ravel() * _PIXEL_SIZE, cy.ravel() * _PIXEL_SIZE, section, _density)
            tissue = np.repeat(np.repeat(np.clip(tissue.reshape(cx.shape), 0.0, 1.5), 4, axis=0), 4, axis=1)[:h, :w]
            tissue = gaussian_filter(tissue.astype(np.float32), 2.0)

            inside = (cell_row >= ya) & (cell_row < yb) & (cell_col >= xa) & (cell_col < xb)
            types = cell_types[inside]
            pixel = (cell_row[inside] - ya) * w + (cell_col[inside] - xa)

            def blobs(radius_um: np.ndarray, peak: np.ndarray, types=types, pixel=pixel, h=h, w=w) -> np.ndarray:
                """Gaussian blobs of the given per-type radius and peak at the cells, one filter per radius."""
                img = np.zeros((h, w), dtype=np.float32)
                for r in np.unique(radius_um):
                    sel = radius_um[types] == r
                    sigma = r / _PIXEL_SIZE / 1.2
                    mass = peak[types[sel]] * 2 * np.pi * sigma**2
                    impulses = np.bincount(pixel[sel], weights=mass, minlength=h * w).reshape(h, w)
                    img += gaussian_filter(impulses.astype(np.float32), sigma, truncate=3.0)
                return img

            dapi = blobs(nucleus_radius, 230.0 * brightness)
            cytoplasm = blobs(cell_radius, cytoplasm_peak)
            dapi += 14.0 * tissue + rng.normal(4.0, 2.5, dapi.shape)
            cytoplasm += 30.0 * tissue + rng.normal(4.0, 2.5, dapi.shape)
            window = np.clip(np.stack([dapi, cytoplasm]), 0, 255).astype(np.uint8)
            out[:, r0:r1, c0:c1] = window[:, r0 - ya : r1 - ya, c0 - xa : c1 - xa]
    return out


def _assemble_spatialdata(
    xy: np.ndarray,
    zone: np.ndarray,
    cell_types: np.ndarray,
    radius: np.ndarray,
    counts: sp.csr_matrix,
    panel: list[str],
    section: _Section,
    image_rng: np.random.Generator | None,
) -> SpatialData:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    n = len(xy)
    instance_id = np.arange(n, dtype=np.int64)
    shapes = ShapesModel.parse(xy, geometry=0, radius=radius, index=instance_id, transformations={"global": Identity()})
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["cells"] * n),
            "instance_id": instance_id,
            "true_cell_type": pd.Categorical.from_codes(cell_types, categories=list(SPATIAL_CELL_TYPES)),
            "true_zone": pd.Categorical.from_codes(zone, categories=list(ZONES)),
        },
        index=pd.Index([f"cell_{i}" for i in instance_id]),
    )
    table = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(panel)), obsm={"spatial": xy.copy()})
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="instance_id")
    images = {}
    if image_rng is not None:
        pixels = _render_image(image_rng, xy, cell_types, section)
        # a large section's image is multiscale and chunked, as a platform's morphology image is
        n_levels = max(0, int(np.ceil(np.log2(max(pixels.shape[1:]) / _MAX_SINGLE_SCALE))))
        large = {"scale_factors": [2] * n_levels, "chunks": (2, 2048, 2048)} if n_levels else {}
        images["image"] = Image2DModel.parse(
            pixels,
            dims=("c", "y", "x"),
            c_coords=["DAPI", "18S"],
            transformations={"global": Scale([_PIXEL_SIZE, _PIXEL_SIZE], axes=("y", "x"))},
            **large,
        )
    return SpatialData(images=images, shapes={"cells": shapes}, tables={"table": table})
